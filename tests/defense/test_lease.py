"""Quota leases: exact accounting through the same interface on the memory and SQLite
stores; statuses at once; a lease returned at most once; a dead replica's lease is lost,
never extra allowance."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from sealserve.defense.lease import LeaseTable
from sealserve.defense.limits import LimitsConfig, Period
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import AccountStatus
from sealserve.defense.store.base import Check, LeaseAsk, StateStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore
from sealserve.errors import ConfigError, RateLimitedError, SuspendedError, UnavailableError

from .conftest import make_store

T0 = 1_700_000_000.0
QUOTA = 100


def windows(account: str = "alice", quota: int = QUOTA) -> tuple[Check, ...]:
    return (
        Check("account.day", "account daily quota", f"a/{account}", quota, period=Period.DAY),
        Check("model.minute", "model per-minute quota", "m/m", 10 * quota, period=Period.MINUTE),
    )


def used(store: StateStore, checks: tuple[Check, ...]) -> int:
    day = store.usage(checks[:1], now=T0)[0]
    return day.limit - day.remaining


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    """The stores with leases: one interface (a Redis Cluster admits per call)."""
    s = make_store(request.param, tmp_path, request)
    request.addfinalizer(s.close)
    assert s.leases
    return s


def test_a_redis_cluster_admits_per_call(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    s = make_store("redis-cluster", tmp_path, request)
    try:
        assert not s.leases
        guard = QuotaGuard(
            LimitsConfig.from_mapping({"tiers": {"t": {"per_day": 3}}, "lease": True}), s
        )
        assert guard.leases is None
        result, lease = s.lease(windows(), LeaseAsk(1, 9, T0, "alice", "c", 1))
        assert result is not None and result.admitted and lease is None
        assert used(s, windows()) == 1
    finally:
        s.close()


def busy_table(store: StateStore) -> LeaseTable:
    """A table that has seen a high admitted rate, so it asks for large slices."""
    table = LeaseTable(store, lease_s=1.0)
    table.admit(windows(), cost=1, now=T0, account="alice")
    rate = table._rates[windows()]
    rate.units, rate.since = 10_000, time.monotonic() - 1.0
    return table


def test_most_admissions_are_local_and_the_count_is_exact(store: StateStore) -> None:
    table = busy_table(store)
    calls = table.store_calls
    admitted = 1
    for _ in range(59):
        admitted += table.admit(windows(), cost=1, now=T0, account="alice").admitted  # type: ignore[union-attr]
    # One status read per call, and only a few lease round trips (not one write per call).
    assert table.store_calls - calls < 59 + 10
    # The leased units are counted in the store while held ...
    assert used(store, windows()) >= admitted
    table.close(now=T0)
    # ... and the unused part comes back exactly once at shutdown.
    assert used(store, windows()) == admitted == 60


def test_never_over_admits_and_near_the_limit_slices_are_one(store: StateStore) -> None:
    a, b = busy_table(store), LeaseTable(store, lease_s=1.0)
    results = [True]  # busy_table's own admit
    for i in range(300):
        table = a if i % 2 else b
        result = table.admit(windows(), cost=1, now=T0, account="alice")
        assert result is not None
        results.append(result.admitted)
    assert sum(results) <= QUOTA
    a.close(now=T0)
    b.close(now=T0)
    assert used(store, windows()) == sum(results)
    # Slices are capped at a fraction of what is left: the last units went one by one,
    # so the replicas between them admitted the whole quota.
    assert sum(results) == QUOTA
    refused = a.admit(windows(), cost=1, now=T0, account="alice")
    assert refused is not None and not refused.admitted
    assert refused.refused_by is not None and refused.refused_by.name == "account.day"


def test_a_lease_is_returned_at_most_once(store: StateStore) -> None:
    result, lease = store.lease(windows(), LeaseAsk(1, 20, T0, "alice", "r1-x", 1.0))
    assert result is not None and result.admitted and lease is not None
    assert lease.units == 20 - 1  # want counts the admitted request too
    assert used(store, windows()) == 20
    store.return_lease("r1-x", 19, now=T0)
    store.return_lease("r1-x", 19, now=T0)  # replayed: gives nothing back
    assert used(store, windows()) == 1
    # More than the lease holds cannot be returned either.
    _, lease2 = store.lease(windows(), LeaseAsk(1, 5, T0, "alice", "r1-y", 1.0))
    assert lease2 is not None and lease2.units == 4
    store.return_lease("r1-y", 1000, now=T0)
    assert used(store, windows()) == 2


def test_a_reset_voids_outstanding_leases(store: StateStore) -> None:
    store.lease(windows(), LeaseAsk(1, 20, T0, "alice", "r", 1))
    store.reset(windows(), now=T0)
    store.admit(windows(), cost=5, now=T0)
    store.return_lease("r", 19, now=T0)  # its record went with the reset
    assert used(store, windows()) == 5


def test_a_dead_replicas_lease_is_lost_not_extra_allowance(store: StateStore) -> None:
    dead = busy_table(store)
    for _ in range(5):
        dead.admit(windows(), cost=1, now=T0, account="alice")
    stranded = dead._held[windows()].left
    assert stranded > 0
    del dead  # killed: it never returns its lease
    live = LeaseTable(store, lease_s=1.0)
    admitted = 0
    for _ in range(2 * QUOTA):
        result = live.admit(windows(), cost=1, now=T0, account="alice")
        assert result is not None
        admitted += result.admitted
    live.close(now=T0)
    assert admitted == QUOTA - 6 - stranded  # the stranded units stay counted
    assert used(store, windows()) == QUOTA


def test_a_suspension_takes_effect_at_once_while_a_lease_is_held(store: StateStore) -> None:
    config = LimitsConfig.from_mapping(
        {"tiers": {"t": {"per_day": QUOTA}}, "lease": True, "lease_s": 5}
    )
    guard = QuotaGuard(config, store)
    assert guard.leases is not None
    guard.admit("alice", "t", "198.51.100.1", "m", now=T0)
    rate = next(iter(guard.leases._rates.values()))
    rate.units, rate.since = 10_000, time.monotonic() - 1.0
    guard.admit("alice", "t", "198.51.100.1", "m", now=T0)
    assert any(h.left > 0 for h in guard.leases._held.values())
    other = QuotaGuard(config, store)  # another replica suspends the account
    other.suspend("alice", reason="test", set_by="op", now=T0)
    with pytest.raises(SuspendedError):
        guard.admit("alice", "t", "198.51.100.1", "m", now=T0)
    assert not guard.leases._held  # the lease went back
    other.lift("alice", reason="test", set_by="op", now=T0)
    assert guard.usage("alice", "t", now=T0)[0].remaining == QUOTA - 2
    guard.admit("alice", "t", "198.51.100.1", "m", now=T0)


def test_statuses_other_than_normal_are_admitted_per_call(store: StateStore) -> None:
    table = busy_table(store)
    store.set_status("alice", AccountStatus.throttled(0.5, reason="r", set_by="s", set_at=T0))
    assert table.admit(windows(), cost=1, now=T0, account="alice") is None
    result, lease = store.lease(windows(), LeaseAsk(1, 9, T0, "alice", "z", 1))
    assert result is None and lease is None


def test_token_buckets_are_never_leased(store: StateStore) -> None:
    bucket = Check("account.rate", "account rate limit", "a/alice", 10, rate=1.0)
    table = LeaseTable(store, lease_s=1.0)
    assert table.admit((bucket, *windows()), cost=1, now=T0, account="alice") is None
    with pytest.raises(ConfigError, match="only quota windows can be leased"):
        store.lease((bucket,), LeaseAsk(1, 5, T0, "alice", "b", 1))


def test_lease_config_is_validated() -> None:
    tiers = {"t": {"per_day": 5}}
    assert LimitsConfig.from_mapping({"tiers": tiers}).lease is False
    with pytest.raises(ConfigError, match="limits.lease must be true or false"):
        LimitsConfig.from_mapping({"tiers": tiers, "lease": "yes"})
    with pytest.raises(ConfigError, match=r"limits.lease_s must be a number in \(0, 60\]"):
        LimitsConfig.from_mapping({"tiers": tiers, "lease": True, "lease_s": 0})


def test_a_refused_lease_consumes_nothing(store: StateStore) -> None:
    guard = QuotaGuard(
        LimitsConfig.from_mapping({"tiers": {"t": {"per_day": 3}}, "lease": True}), store
    )
    for _ in range(3):
        guard.admit("bob", "t", "198.51.100.1", "m", now=T0)
    with pytest.raises(RateLimitedError, match="account daily quota of 3 requests exhausted"):
        guard.admit("bob", "t", "198.51.100.1", "m", now=T0)
    assert guard.usage("bob", "t", now=T0)[0].remaining == 0


def test_the_event_loop_path_admits_inline_and_falls_back_when_the_file_is_held(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    config = LimitsConfig.from_mapping({"tiers": {"t": {"per_day": QUOTA}}, "lease": True})
    guard = QuotaGuard(config, store)

    async def admit() -> int:
        result = await guard.admit_async("alice", "t", "p", "m", deadline_s=0.2, now=T0)
        return result.remaining[0].remaining

    assert asyncio.run(admit()) == QUOTA - 1
    # Another process holds the write lock: the lease path cannot run inline, waits in
    # a worker thread and is refused within the deadline, consuming nothing.
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    guard.leases._held.clear()  # type: ignore[union-attr]  # force a store write
    with pytest.raises(UnavailableError, match="did not answer within"):
        asyncio.run(admit())
    other.execute("ROLLBACK")
    other.close()
    assert asyncio.run(admit()) < QUOTA - 1
    guard.close(now=T0)
    store.close()


def test_expired_leases_of_quiet_accounts_go_back(store: StateStore) -> None:
    table = busy_table(store)
    table.admit(windows(), cost=1, now=T0, account="alice")
    assert table._held[windows()].left > 0
    # Alice goes quiet; bob's next lease, after alice's expired, gives hers back.
    table.admit(windows("bob"), cost=1, now=T0 + 2, account="bob")
    assert windows() not in table._held
    assert used(store, windows()) == 2


def test_the_event_loop_path_is_exact_and_sees_statuses(store: StateStore) -> None:
    config = LimitsConfig.from_mapping({"tiers": {"t": {"per_day": QUOTA}}, "lease": True})
    guard = QuotaGuard(config, store)
    assert guard.leases is not None

    async def admit_all(n: int) -> list[bool]:
        out = []
        for _ in range(n):
            try:
                await guard.admit_async("carol", "t", "p", "m", deadline_s=1.0, now=T0)
                out.append(True)
            except RateLimitedError:
                out.append(False)
        return out

    first = asyncio.run(admit_all(60))
    assert guard.leases.store_writes < 40  # slices, not one write per admission
    guard.suspend("carol", reason="test", set_by="op", now=T0)
    with pytest.raises(SuspendedError):
        asyncio.run(admit_all(1))
    guard.lift("carol", reason="test", set_by="op", now=T0)
    rest = asyncio.run(admit_all(2 * QUOTA))
    assert sum(first) + sum(rest) == QUOTA
    guard.close(now=T0)
    assert guard.usage("carol", "t", now=T0)[0].remaining == 0


def test_a_hung_redis_refuses_leased_admissions_within_the_deadline(
    request: pytest.FixtureRequest,
) -> None:
    """SIGSTOP redis-server: the lease path (status read, lease) fails closed within
    the deadline on the event loop, and consumes nothing it did not count."""
    server = request.getfixturevalue("own_redis")
    store = RedisStore.from_url(server.url, prefix="hang")
    guard = QuotaGuard(
        LimitsConfig.from_mapping({"tiers": {"t": {"per_day": QUOTA}}, "lease": True}), store
    )

    async def admit() -> None:
        await guard.admit_async("dan", "t", "p", "m", deadline_s=0.3, now=T0)

    asyncio.run(admit())
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        t = time.perf_counter()
        with pytest.raises(UnavailableError, match="did not answer within 0.3 s"):
            asyncio.run(admit())
        assert time.perf_counter() - t < 1.0
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    asyncio.run(admit())
    guard.close(now=T0)
    assert guard.usage("dan", "t", now=T0)[0].remaining <= QUOTA - 2
    store.close()


def test_a_lease_displaced_by_a_concurrent_taker_is_given_back(store: StateStore) -> None:
    table = LeaseTable(store, lease_s=1.0)
    for lease_id in ("first", "second"):  # two takers raced for the same account
        result, lease = store.lease(windows(), LeaseAsk(1, 10, T0, "alice", lease_id, 1.0))
        table._install(windows(), 1, T0, result, lease)
    assert len(table._displaced) == 1
    assert used(store, windows()) == 20
    table.close(now=T0)
    assert used(store, windows()) == 2  # both spares came back, once each
