#!/usr/bin/env python3
"""What the whole defense layer adds per request inside the server.

Calls the OIP servicer in process (no network) with batch-1 held-out digits, with
quotas on, and compares: no `[defense]` vs the standard profile with detection
(PRADA, distribution, volume), graduated responses and the audit log; the defended
server once with detector state held in process and written behind (the server's way,
defense/detect/cache.py) and once with every detector reading and writing its blob in
the store on every row (the way before; the bench swaps the cache out). On the memory
store, SQLite and, when redis-server is installed, a Redis on loopback. CPU µs per
request (all threads of this process; redis-server's own CPU is not counted), median
of rounds, the variants alternating within each round.

    python bench/bench_defense_server.py [--n 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sealserve import demo  # noqa: E402
from sealserve._proto import grpc_service_pb2 as pb  # noqa: E402
from sealserve.server import defenses  # noqa: E402
from sealserve.server.app import Server  # noqa: E402
from sealserve.server.grpc.servicer import InferenceServicer  # noqa: E402
from sealserve.server.logs import configure  # noqa: E402
from sealserve.server.settings import Settings  # noqa: E402
from tests._redis import REDIS_SERVER, RedisServer  # noqa: E402

LIMITS = {"tiers": {"standard": {"rate": 1e6, "burst": 1000000, "per_day": 10**9}},
          "default_tier": "standard"}  # fmt: skip


def defense(d: str) -> dict[str, Any]:
    return {
        "audit": {"dir": d + "/audit"},
        "profiles": {"p": {"noise": {"dist": "laplace", "scale": 0.02}, "renormalise": True,
                           "preserve_top1": True, "round": 3, "coarsen": {"input_scale": 16},
                           "watermark": {"fraction": 0.002}}},
        "models": {"digits": {"output": "probabilities", "label": "label", "profile": "p",
                              "reference": str(demo.reference_path()),
                              "volume": {"normal_per_window": 1e9, "burst_per_window": 1e10}}},
    }  # fmt: skip


class Ctx:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def set_trailing_metadata(self, md: Any) -> None:
        pass


async def measure(store: str, with_defense: bool, n: int, *, write_behind: bool = True) -> float:
    d = tempfile.mkdtemp()
    kw: dict[str, Any] = dict(port=0, unsafe_plaintext=True, unsafe_disable_auth=True,
                              model_repository=demo.repository(),
                              state_store=store.format(d=d), limits=LIMITS)  # fmt: skip
    if with_defense:
        kw["defense"] = defense(d)
    real = defenses.StateCache
    if not write_behind:
        defenses.StateCache = lambda store, **_: store  # type: ignore[assignment,misc]
    try:
        server = Server(Settings.load(None, **kw))
        await server.start()
    finally:
        defenses.StateCache = real  # type: ignore[misc]
    sv = InferenceServicer(server.plane, server.metrics)
    xs = demo.holdout()[0]
    reqs = []
    for i in range(len(xs)):
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype="FP32", shape=(1, 64))
        r.raw_input_contents.append(xs[i : i + 1].tobytes())
        reqs.append(r.SerializeToString())
    ctx = Ctx()
    for i in range(300):
        await sv.ModelInfer(pb.ModelInferRequest.FromString(reqs[i % len(reqs)]), ctx)
    t = time.process_time()
    for i in range(n):
        await sv.ModelInfer(pb.ModelInferRequest.FromString(reqs[i % len(reqs)]), ctx)
    cpu = (time.process_time() - t) / n * 1e6
    await server.stop(0)
    return cpu


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    configure("text", "error")
    stores = {"memory": "memory:", "sqlite": "sqlite://{d}/s.db"}
    rpx = None
    if REDIS_SERVER is not None:
        rpx = RedisServer(Path(tempfile.mkdtemp()))
        rpx.start()
        stores["redis"] = rpx.url
    print("| state store | no [defense] µs/req | [defense], per-row store I/O µs/req "
          "| [defense], write-behind µs/req | added: per-row / write-behind | "
          "write-behind / per-row |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for name, store in stores.items():
            base, before, after = [], [], []
            for _ in range(args.rounds):
                base.append(await measure(store, False, args.n))
                before.append(await measure(store, True, args.n, write_behind=False))
                after.append(await measure(store, True, args.n))
            b = statistics.median(base)
            f0, f1 = statistics.median(before), statistics.median(after)
            print(f"| {name} | {b:.0f} | {f0:.0f} | {f1:.0f} | {f0 - b:.0f} / {f1 - b:.0f} "
                  f"| {f1 / f0:.2f}x |")  # fmt: skip
    finally:
        if rpx is not None:
            rpx.stop()
    cores = len(os.sched_getaffinity(0))
    print(f"\nBatch-1 requests through the OIP servicer in process (decode, quota admit, "
          f"inference, detection on each row, response policy, perturbation + watermark, "
          f"audit append, encode); no network; {args.n} requests per measurement, "
          f"{args.rounds} rounds, median. Machine: {cores} cores, shared (noisy: compare "
          f"within a row). Redis on loopback: its own CPU is not in these figures.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
