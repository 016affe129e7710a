"""Cost of one quota admit per store: server CPU per admit and latency percentiles.

    PYTHONPATH=. python bench/bench_quota.py [--n 20000]

Starts its own redis-server on 127.0.0.1 (no persistence) when one is installed, uses a
SQLite file in a temporary directory, and prints a markdown table. Each admit is the full
QuotaGuard.admit of a request with 6 limits (account rate/minute/day/month, peer minute,
model minute) plus the account status read.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from sealserve.defense.limits import LimitsConfig
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.store.base import StateStore
from sealserve.defense.store.memory import MemoryStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore

CONFIG = {
    "tiers": {
        "bench": {
            "rate": 1e9,
            "burst": 10**9,
            "per_minute": 10**9,
            "per_day": 10**9,
            "per_month": 10**9,
        }
    },
    "peer": {"per_minute": 10**9},
    "model": {"per_minute": 10**9},
}


LIGHT = {  # a smaller, common setup: account rate + daily quota, peer per-minute
    "tiers": {"bench": {"rate": 1e9, "burst": 10**9, "per_day": 10**9}},
    "peer": {"per_minute": 10**9},
}


def measure(store: StateStore, n: int, config: dict[str, Any] = CONFIG) -> dict[str, float]:
    guard = QuotaGuard(LimitsConfig.from_mapping(config), store)
    accounts = [f"acct{i}" for i in range(50)]
    for i in range(200):  # warm up: prepared statements, script cache, connections
        guard.admit(accounts[i % 50], "bench", "198.51.100.1", "m", now=1.7e9 + i)
    lat = []
    cpu0 = time.process_time()
    for i in range(n):
        t = time.perf_counter()
        guard.admit(accounts[i % 50], "bench", f"198.51.100.{i % 7}", "m", now=1.7e9 + i * 1e-3)
        lat.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    lat.sort()
    return {
        "cpu_us": cpu / n * 1e6,
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def ping(url: str, n: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        client.ping()
        lat.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    client.close()
    lat.sort()
    return {
        "cpu_us": cpu / n * 1e6,
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.01)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000, help="admits per store")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("memory", measure(MemoryStore(), args.n)))
        sqlite = SqliteStore(Path(tmp) / "state.db")
        rows.append(("sqlite (WAL, file in tmp)", measure(sqlite, args.n)))
        sqlite.close()
        sqlite = SqliteStore(Path(tmp) / "light.db")
        rows.append(("sqlite, 3 limits only", measure(sqlite, args.n, LIGHT)))
        sqlite.close()
        proc, url = start_redis(Path(tmp))
        try:
            rows.append(("redis PING alone (round-trip floor)", ping(url, args.n)))
            rstore = RedisStore.from_url(url)
            rows.append(("redis (loopback)", measure(rstore, args.n)))
            rstore.close()
        finally:
            proc.terminate()
            proc.wait()
    print(f"QuotaGuard.admit, 6 limits + status read, {args.n} admits per store\n")
    print("| store | client CPU µs/admit | p50 latency µs | p99 latency µs |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['cpu_us']:.1f} | {r['p50_us']:.1f} | {r['p99_us']:.1f} |")


if __name__ == "__main__":
    main()
