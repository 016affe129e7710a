"""Exactness under concurrency: threads, and two processes sharing SQLite, Redis or a
Redis Cluster (where an admit is one script per subject, all or nothing by refunds)."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from pathlib import Path

import pytest

from sealserve.defense.limits import Period
from sealserve.defense.store.base import Check, StateStore
from sealserve.defense.store.memory import MemoryStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore

from .conftest import RedisClusterServers, RedisServer

T0 = 1_700_000_000.0
ACCOUNTS = [f"acct{i}" for i in range(5)]
ACCOUNT_QUOTA = 200
MODEL_QUOTA = 700  # < 5 * 200: the shared model window binds before the account ones


def checks_for(account: str) -> list[Check]:
    return [
        Check(
            "account.rate",
            "account rate limit",
            f"a/{account}",
            1000,
            rate=0.001,
            throttle=True,
        ),
        Check(
            "account.day", "account daily quota", f"a/{account}", ACCOUNT_QUOTA, period=Period.DAY
        ),
        Check(
            "model.minute", "model per-minute quota", "m/model", MODEL_QUOTA, period=Period.MINUTE
        ),
    ]


def hammer(store: StateStore, threads: int, per_thread: int) -> tuple[Counter[str], int]:
    """Run admits from ``threads`` threads; return admitted per account and refusals."""
    admitted: Counter[str] = Counter()
    refused = 0
    lock = threading.Lock()

    def run(tid: int) -> None:
        nonlocal refused
        for i in range(per_thread):
            account = ACCOUNTS[(tid + i) % len(ACCOUNTS)]
            result = store.admit(checks_for(account), cost=1, now=T0, account=account)
            with lock:
                if result.admitted:
                    admitted[account] += 1
                else:
                    refused += 1

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return admitted, refused


def assert_exact(store: StateStore, admitted: Counter[str], refused: int, sent: int) -> None:
    assert sum(admitted.values()) + refused == sent
    assert sum(admitted.values()) == MODEL_QUOTA  # exactly: never more, and no lost admit
    for account in ACCOUNTS:
        assert admitted[account] <= ACCOUNT_QUOTA
        # All-or-nothing under contention: refused admits consumed nothing.
        day = store.usage(checks_for(account)[1:2], now=T0)[0]
        assert ACCOUNT_QUOTA - day.remaining == admitted[account]


def _open(kind: str, where: str) -> StateStore:
    if kind == "sqlite":
        return SqliteStore(where, busy_timeout_s=30)
    url, prefix = where.split(" ")
    return RedisStore.from_url(url, prefix=prefix, timeout_s=10)


def _process_main(
    kind: str,
    where: str,
    threads: int,
    per_thread: int,
    out: multiprocessing.Queue[tuple[dict[str, int], int]],
    start: threading.Barrier,
) -> None:
    store = _open(kind, where)
    start.wait(timeout=60)  # both processes hammer at the same time
    admitted, refused = hammer(store, threads, per_thread)
    store.close()
    out.put((dict(admitted), refused))


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "redis-cluster"])
def test_threads_never_over_admit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: StateStore
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SqliteStore(tmp_path / "s.db")
    elif kind == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        store = RedisStore.from_url(cluster.url, prefix="conc-threads")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore.from_url(server.url, prefix="conc-threads")
    admitted, refused = hammer(store, threads=8, per_thread=110)
    assert_exact(store, admitted, refused, sent=880)
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "redis", "redis-cluster"])
def test_two_processes_never_over_admit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        where = str(tmp_path / "shared.db")
        SqliteStore(where).close()  # create the schema before the race
    elif kind == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        where = f"{cluster.url} conc-procs"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        where = f"{server.url} conc-procs"
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[dict[str, int], int]] = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_process_main, args=(kind, where, 4, 150, out, start)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    admitted: Counter[str] = Counter()
    refused = 0
    for counts, ref in results:
        admitted.update(counts)
        refused += ref
    assert all(counts for counts, _ in results), "both processes must have admitted some"
    check_store = _open(kind, where)
    assert_exact(check_store, admitted, refused, sent=1200)
    check_store.close()
