"""Quota leases: store calls, store writes and client CPU per admission, with and
without leases, side by side in one run.

    PYTHONPATH=. python bench/bench_lease.py [--n 20000]

Each admission is the full QuotaGuard.admit (and, in the rows so named, the server's
QuotaGuard.admit_async awaited on an event loop) of a request whose limits are all quota
windows (leases lease only windows): account minute/day/month, peer minute, model
minute; 50 accounts in turn, one replica. Without leases every admission is one store
call that writes (SQLite: one BEGIN IMMEDIATE transaction; Redis: one EVALSHA). With
leases it is one status read (a SELECT; a Redis HGET) plus, per slice, one lease
(and one return). Starts its own redis-server on 127.0.0.1 when one is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_quota import start_redis
from sealserve.defense.limits import LimitsConfig
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.store.base import StateStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore

WINDOWS: dict[str, Any] = {
    "tiers": {"bench": {"per_minute": 10**6, "per_day": 10**9, "per_month": 10**9}},
    "peer": {"per_minute": 10**9},
    "model": {"per_minute": 10**9},
}


def measure(store: StateStore, n: int, *, lease: bool, loop: bool = False) -> dict[str, float]:
    """``loop``: the server's path, ``admit_async`` awaited on an event loop."""
    config = LimitsConfig.from_mapping({**WINDOWS, "lease": lease, "lease_s": 1.0})
    guard = QuotaGuard(config, store)
    accounts = [f"acct{i}" for i in range(50)]

    async def run(count: int, step: float) -> None:
        for i in range(count):
            await guard.admit_async(accounts[i % 50], "bench", "198.51.100.1", "m",
                                    deadline_s=5.0, now=1.7e9 + i * step)  # fmt: skip

    def admit(count: int, step: float) -> None:
        if loop:
            asyncio.run(run(count, step))
            return
        for i in range(count):
            guard.admit(accounts[i % 50], "bench", "198.51.100.1", "m", now=1.7e9 + i * step)

    admit(500, 0.0)  # warm up: statements, scripts, connections, the rate estimate
    calls0 = guard.leases.store_calls if guard.leases else 0
    writes0 = guard.leases.store_writes if guard.leases else 0
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    admit(n, 1e-4)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    if guard.leases is None:
        calls = writes = float(n)
    else:
        calls = guard.leases.store_calls - calls0
        writes = guard.leases.store_writes - writes0
    guard.close()
    return {
        "calls": calls / n,
        "writes": writes / n,
        "cpu_us": cpu / n * 1e6,
        "wall_us": wall / n * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000, help="admits per run")
    args = parser.parse_args()
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for loop in (False, True):
            name = "sqlite, admit_async on a loop" if loop else "sqlite"
            for lease in (False, True):
                sqlite = SqliteStore(Path(tmp) / f"state-{lease}-{loop}.db")
                r = measure(sqlite, args.n, lease=lease, loop=loop)
                rows.append((name, "on" if lease else "off", r))
                sqlite.close()
        proc, url = start_redis(Path(tmp))
        try:
            for loop in (False, True):
                name = "redis (loopback), admit_async on a loop" if loop else "redis (loopback)"
                for lease in (False, True):
                    rstore = RedisStore.from_url(
                        url, prefix=f"b{int(lease)}{int(loop)}", timeout_s=5.0
                    )
                    r = measure(rstore, args.n, lease=lease, loop=loop)
                    rows.append((name, "on" if lease else "off", r))
                    rstore.close()
        finally:
            proc.terminate()
            proc.wait()
    print(f"QuotaGuard.admit, 5 quota windows + status, 50 accounts, {args.n} admits per run; "
          f"one replica, {os.cpu_count()} cores (shared with other work: noisy, compare "
          "ratios within this run)\n")  # fmt: skip
    print("| store | leases | store calls/admit | store writes/admit | client CPU µs/admit "
          "| wall µs/admit | CPU vs no lease |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    base: dict[str, float] = {}
    for store, lease, r in rows:
        base.setdefault(store, r["cpu_us"])
        print(f"| {store} | {lease} | {r['calls']:.3f} | {r['writes']:.4f} | {r['cpu_us']:.1f} "
              f"| {r['wall_us']:.1f} | {r['cpu_us'] / base[store]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
