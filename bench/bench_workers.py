#!/usr/bin/env python3
"""``workers = N`` (issue 17, item 3): the full defense on SQLite with one serving
process against two on one port, beside the bare server, in one run.

Systems, each over loopback gRPC (plaintext everywhere, so transport costs match),
batch-1 held-out digits rows that vary per request, 64 accounts (bench_defended's
tokens, tier and defense profile: auth, quotas, detection, perturbation, watermark,
signed audit log):

- ``bare``: bench/bare_server.py, one process (the baseline);
- ``full defense, sqlite, workers = 1``;
- ``full defense, sqlite, workers = 2``: two worker processes on the one port.

The load is one process with c=64 callers over 16 connections of their own (a local
subchannel pool each: the kernel spreads connections, not calls, among the workers).
Measured: req/s, p50/p99 and server CPU per request (every server process's
utime+stime from /proc), alternating rounds, median of the rounds. Servers and load
share every core (no pinning): on a 2-core machine two workers plus the load generator
contend for two cores, so k = 2 is all it can show and the gain is bounded by the load
generator's own share.

    python bench/bench_workers.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import bench_defended  # noqa: E402
from bench.bench_defended import Bench, Metadata, payloads  # noqa: E402
from bench.bench_serving import proc_cpu_s  # noqa: E402

CONNECTIONS = 16
CONCURRENCY = 64


async def _load(target: str, reqs: Sequence[bytes], mds: Sequence[Metadata],
                seconds: float) -> tuple[list[float], dict[str, int]]:  # fmt: skip
    # One connection per channel: gRPC would otherwise share one among equal channels.
    return await bench_defended._load([target], reqs, mds, CONCURRENCY, seconds,
                                      connections=CONNECTIONS,
                                      options=[("grpc.use_local_subchannel_pool", 1)])  # fmt: skip


def server_pids(ready: Path) -> list[int]:
    info = json.loads(ready.read_text())
    return [info["pid"], *info.get("workers", [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    reqs = payloads()
    with tempfile.TemporaryDirectory(prefix="sealserve-workers-bench-") as tmp_s:
        tmp = Path(tmp_s)
        bench = Bench(tmp, cpus, cpus)
        try:
            systems: dict[str, tuple[str, list[int]]] = {}
            _, target = bench.bare("bare", cpus)
            systems["bare"] = (target, server_pids(tmp / "bare" / "ready.json"))
            for k in (1, 2):
                store = f"sqlite://{tmp / 'state.db'}"
                cfg = bench.config(f"workers-{k}", auth=True, store=store, defense=True)
                cfg.write_text(f"workers = {k}\nharden_process = false\n" + cfg.read_text())
                _, target = bench.sealserve(cfg, cpus)
                name = f"full defense, sqlite, workers = {k}"
                systems[name] = (target, server_pids(cfg.parent / "ready.json"))
            results: dict[str, list[tuple[float, float, float, float]]] = {s: [] for s in systems}
            errors: dict[str, dict[str, int]] = {s: {} for s in systems}
            for target, _ in systems.values():  # warm-up
                asyncio.run(_load(target, reqs, bench.mds, 0.5))
            for r in range(args.rounds):
                for name, (target, pids) in systems.items():
                    cpu0, t0 = sum(map(proc_cpu_s, pids)), time.perf_counter()
                    lat, errs = asyncio.run(_load(target, reqs, bench.mds, args.seconds))
                    wall = time.perf_counter() - t0
                    cpu = sum(map(proc_cpu_s, pids)) - cpu0
                    lat.sort()
                    n = max(len(lat), 1)
                    results[name].append((len(lat) / wall, lat[len(lat) // 2] * 1e3,
                                          lat[int(len(lat) * 0.99)] * 1e3, cpu / n * 1e6))  # fmt: skip
                    for code, m in errs.items():
                        errors[name][code] = errors[name].get(code, 0) + m
                    print(f"# round {r + 1} {name}: {len(lat) / wall:,.0f} req/s", flush=True)
        finally:
            bench.stop()
    med = {s: tuple(statistics.median(v[i] for v in rs) for i in range(4))
           for s, rs in results.items()}  # fmt: skip
    bare = med["bare"]
    one = med["full defense, sqlite, workers = 1"]
    print(f"Machine: {len(cpus)} cores (shared with other work: noisy), servers and load "
          f"unpinned on all of them; c={CONCURRENCY} over {CONNECTIONS} connections, "
          f"{args.rounds} rounds x {args.seconds:g} s, medians.\n")  # fmt: skip
    print(
        "| system | req/s | vs bare | vs workers = 1 | p50 ms | p99 ms "
        "| server CPU/req µs | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (rps, p50, p99, cpu) in med.items():
        errs = ", ".join(f"{c} {m}" for c, m in sorted(errors[name].items())) or "0"
        print(f"| {name} | {rps:,.0f} | {rps / bare[0]:.2f}x | {rps / one[0]:.2f}x | "
              f"{p50:.2f} | {p99:.2f} | {cpu:.0f} | {errs} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
