"""Exactness under concurrency: threads, and two processes sharing SQLite, Redis or a
Redis Cluster (where an admit is one script per subject, all or nothing by refunds)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sealserve.defense.lease import LeaseTable
from sealserve.defense.limits import Period
from sealserve.defense.store.base import Check, StateStore
from sealserve.defense.store.memory import MemoryStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore

from .conftest import RedisClusterServers, RedisServer

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

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


def leased_checks(account: str) -> tuple[Check, ...]:
    """The same limits without the token bucket: only quota windows are leased."""
    return tuple(checks_for(account)[1:])


def hammer(
    store: StateStore,
    threads: int,
    per_thread: int,
    leases: LeaseTable | None = None,
    progress: Synchronized[int] | None = None,
) -> tuple[Counter[str], int]:
    """Run admits from ``threads`` threads (through ``leases`` when given); return
    admitted per account and refusals. ``progress`` counts admits as they happen."""
    admitted: Counter[str] = Counter()
    refused = 0
    lock = threading.Lock()

    def run(tid: int) -> None:
        nonlocal refused
        for i in range(per_thread):
            account = ACCOUNTS[(tid + i) % len(ACCOUNTS)]
            if leases is None:
                result = store.admit(checks_for(account), cost=1, now=T0, account=account)
            else:
                leased = leases.admit(leased_checks(account), cost=1, now=T0, account=account)
                assert leased is not None
                result = leased
            with lock:
                if result.admitted:
                    admitted[account] += 1
                    if progress is not None:
                        with progress.get_lock():
                            progress.value += 1
                else:
                    refused += 1

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return admitted, refused


def assert_exact(
    store: StateStore, admitted: Counter[str], refused: int, sent: int, *, leased: bool = False
) -> None:
    assert sum(admitted.values()) + refused == sent
    if leased:
        # A replica may hold the last units in a lease while the other is refused, so
        # fewer may be admitted; never more, and once every lease is back the store
        # counts exactly what was admitted (below).
        assert sum(admitted.values()) <= MODEL_QUOTA
    else:
        assert sum(admitted.values()) == MODEL_QUOTA  # exactly: never more, no lost admit
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
    lease_holder: str = "",
    progress: Synchronized[int] | None = None,
) -> None:
    store = _open(kind, where)
    leases = LeaseTable(store, lease_s=30.0, holder=lease_holder) if lease_holder else None
    start.wait(timeout=60)  # both processes hammer at the same time
    admitted, refused = hammer(store, threads, per_thread, leases, progress)
    if leases is not None:
        leases.close(now=T0)  # shutdown: unused units go back
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


LEASED_KINDS = ["sqlite", "redis"]  # the stores with leases (a cluster admits per call)


def _where(kind: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str) -> str:
    if kind == "sqlite":
        where = str(tmp_path / "shared.db")
        SqliteStore(where).close()  # create the schema before the race
        return where
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url} {prefix}"


def _recorded_lease_units(store: StateStore, holder: str) -> int:
    """Units of the leases ``holder`` took and never returned (recorded at grant)."""
    if isinstance(store, SqliteStore):
        row = store._conn.execute(
            "SELECT COALESCE(SUM(units), 0) FROM (SELECT DISTINCT id, units FROM leases "
            "WHERE id LIKE ?)",
            (f"{holder}-%",),
        ).fetchone()
        return int(row[0])
    assert isinstance(store, RedisStore)
    keys = store._r.keys(f"{store.prefix}:{{leases}}:{holder}-*")
    return sum(int(store._r.hget(k, "u") or 0) for k in keys)


@pytest.mark.parametrize("kind", LEASED_KINDS)
def test_threads_with_leases_never_over_admit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _open(kind, _where(kind, tmp_path, request, "lease-threads"))
    leases = LeaseTable(store, lease_s=30.0)
    admitted, refused = hammer(store, threads=8, per_thread=110, leases=leases)
    leases.close(now=T0)
    assert_exact(store, admitted, refused, sent=880, leased=True)
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", LEASED_KINDS)
def test_two_replicas_with_leases_x50_clients_never_over_admit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = _where(kind, tmp_path, request, "lease-procs")
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[dict[str, int], int]] = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_process_main, args=(kind, where, 25, 24, out, start, f"r{i}"))
        for i in range(2)
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
    assert all(counts for counts, _ in results), "both replicas must have admitted some"
    check_store = _open(kind, where)
    assert_exact(check_store, admitted, refused, sent=1200, leased=True)
    check_store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", LEASED_KINDS)
def test_a_replica_killed_mid_run_leaves_no_extra_allowance(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Replica A is killed (-9) while it holds leases; replica B then runs its 25
    clients to exhaustion. A's leased units stay counted: B plus everything A admitted
    never exceeds the quota, and the store counts A's unreturned lease as used."""
    where = _where(kind, tmp_path, request, "lease-kill")
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[dict[str, int], int]] = ctx.Queue()
    start = ctx.Barrier(2)
    a_admitted = ctx.Value("q", 0)
    victim = ctx.Process(
        target=_process_main, args=(kind, where, 25, 10**6, out, start, "A", a_admitted)
    )
    victim.start()
    survivor_start = ctx.Barrier(2)
    survivor = ctx.Process(
        target=_process_main, args=(kind, where, 25, 40, out, survivor_start, "B")
    )
    start.wait(timeout=60)  # A alone first, so it is mid-run (and leasing) when killed
    deadline = time.monotonic() + 60
    while a_admitted.value < 150 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=30)
    assert victim.exitcode == -signal.SIGKILL
    survivor.start()
    survivor_start.wait(timeout=60)
    b_counts, b_refused = out.get(timeout=120)
    survivor.join(timeout=30)
    assert survivor.exitcode == 0
    assert sum(b_counts.values()) + b_refused == 1000
    store = _open(kind, where)
    # Leases A held when it died: recorded in the store, never returned (their units
    # at grant; A had used part of them).
    recorded = _recorded_lease_units(store, "A")
    model = store.usage(leased_checks(ACCOUNTS[0])[1:], now=T0)[0]
    used = model.limit - model.remaining
    a_counted = a_admitted.value  # may lag A's true count by its 25 in-flight admits
    total = a_counted + sum(b_counts.values())
    assert total <= MODEL_QUOTA  # no over-admission: A's lease gave B nothing extra
    assert recorded > 0, "A must have died holding leases"
    # The store counts every admit plus the unused part of A's leases, nothing else:
    # those units are lost for this window, not given to anyone.
    assert total <= used <= total + recorded + 25
    for account in ACCOUNTS:
        assert b_counts.get(account, 0) <= ACCOUNT_QUOTA
    store.close()
