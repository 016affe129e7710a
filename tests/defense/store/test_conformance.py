"""One conformance suite, run against MemoryStore, SqliteStore and RedisStore."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealserve.defense.limits import Period
from sealserve.defense.status import AccountStatus, Status
from sealserve.defense.store.base import Check, StateStore
from sealserve.errors import ConfigError
from tests.defense.conftest import make_store

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def bucket(
    burst: int = 3, rate: float = 1.0, key: str = "a/alice", acct: str | None = None
) -> Check:
    return Check(
        "account.rate", "account rate limit", key, burst, rate=rate, throttle=acct is not None
    )


def window(period: Period, limit: int, key: str = "a/alice") -> Check:
    return Check(
        f"account.{period.value}", f"account {period.value} quota", key, limit, period=period
    )


def test_bucket_refill_math(store: StateStore) -> None:
    b = bucket(burst=3, rate=2.0)
    for left in (2, 1, 0):
        r = store.admit([b], cost=1, now=T0)
        assert r.admitted and r.remaining[0].remaining == left
    refused = store.admit([b], cost=1, now=T0)
    assert not refused.admitted and refused.refused_by == b
    assert refused.retry_after == pytest.approx(0.5)
    assert store.admit([b], cost=1, now=T0 + 0.25).retry_after == pytest.approx(0.25)
    ok = store.admit([b], cost=1, now=T0 + 0.5)
    assert ok.admitted and ok.remaining[0].remaining == 0
    # Refill caps at burst however long the bucket idles.
    r = store.admit([b], cost=1, now=T0 + 1000)
    assert r.remaining[0].remaining == 2
    assert r.remaining[0].reset_after == pytest.approx(0.5)


def test_bucket_clock_going_backwards_does_not_refill(store: StateStore) -> None:
    b = bucket(burst=1, rate=1.0)
    assert store.admit([b], cost=1, now=T0).admitted
    assert not store.admit([b], cost=1, now=T0 - 5).admitted
    assert not store.admit([b], cost=1, now=T0 + 0.5).admitted
    assert store.admit([b], cost=1, now=T0 + 1.0).admitted


@pytest.mark.parametrize(
    ("period", "start", "length"),
    [
        (Period.MINUTE, T0 - T0 % 60, 60.0),
        (Period.DAY, T0 - T0 % 86400, 86400.0),
        (Period.MONTH, datetime(2023, 11, 1, tzinfo=UTC).timestamp(), 30 * 86400.0),
    ],
)
def test_window_rolls_over(store: StateStore, period: Period, start: float, length: float) -> None:
    w = window(period, 2)
    assert store.admit([w], cost=1, now=start).admitted
    last = start + length - 1
    r = store.admit([w], cost=1, now=last)
    assert r.admitted and r.remaining[0].remaining == 0
    assert r.remaining[0].reset_after == pytest.approx(1.0)
    refused = store.admit([w], cost=1, now=last)
    assert not refused.admitted and refused.retry_after == pytest.approx(1.0)
    nxt = store.admit([w], cost=1, now=start + length)
    assert nxt.admitted and nxt.remaining[0].remaining == 1


def test_month_is_calendar_month_utc(store: StateStore) -> None:
    w = window(Period.MONTH, 1)
    feb_end = datetime(2024, 3, 1, tzinfo=UTC).timestamp() - 0.5
    assert store.admit([w], cost=1, now=feb_end - 28 * 86400 + 1).admitted  # 1 Feb 2024
    refused = store.admit([w], cost=1, now=feb_end)
    assert not refused.admitted and refused.retry_after == pytest.approx(0.5)
    assert store.admit([w], cost=1, now=feb_end + 0.5).admitted


def test_all_or_nothing(store: StateStore) -> None:
    big = window(Period.DAY, 5, key="a/alice")
    small = window(Period.DAY, 1, key="p/10.0.0.1")
    rate = bucket(burst=10, rate=1.0)
    assert store.admit([rate, big, small], cost=1, now=T0).admitted
    refused = store.admit([rate, big, small], cost=1, now=T0)
    assert not refused.admitted and refused.refused_by == small
    left = {x.name: x.remaining for x in store.usage([rate, big], now=T0)}
    assert left == {"account.rate": 9, "account.day": 4}


def test_cost_and_impossible_cost(store: StateStore) -> None:
    w = window(Period.MINUTE, 5)
    assert store.admit([w], cost=3, now=T0).remaining[0].remaining == 2
    refused = store.admit([w], cost=3, now=T0)
    assert not refused.admitted and refused.retry_after is not None
    too_big = store.admit([w], cost=6, now=T0 + 3600)
    assert not too_big.admitted and too_big.retry_after is None
    b = bucket(burst=2)
    assert store.admit([b], cost=3, now=T0).retry_after is None
    with pytest.raises(ConfigError, match="cost must be a positive integer"):
        store.admit([w], cost=0, now=T0)


def test_refusal_names_the_longest_wait(store: StateStore) -> None:
    minute = window(Period.MINUTE, 1)
    day = window(Period.DAY, 1)
    assert store.admit([minute, day], cost=1, now=T0).admitted
    refused = store.admit([minute, day], cost=1, now=T0)
    assert refused.refused_by == day
    assert refused.retry_after == pytest.approx(86400 - T0 % 86400)


def test_throttle_multiplies_rate_inside_admit(store: StateStore) -> None:
    b = bucket(burst=1, rate=10.0, acct="alice")
    assert store.admit([b], cost=1, now=T0, account="alice").admitted
    assert store.admit([b], cost=1, now=T0 + 0.1, account="alice").admitted
    throttled = AccountStatus.throttled(
        0.1, reason="detector", set_by="detector", set_at=T0, expires_at=T0 + 100
    )
    store.set_status("alice", throttled)
    refused = store.admit([b], cost=1, now=T0 + 0.2, account="alice")
    assert not refused.admitted and refused.retry_after == pytest.approx(0.9)
    assert refused.refused_by == b and refused.status == throttled
    assert store.usage([b], now=T0 + 0.2, account="alice")[0].reset_after == pytest.approx(0.9)
    assert store.admit([b], cost=1, now=T0 + 1.1, account="alice").admitted
    # Checks not marked ``throttle`` keep the full rate (e.g. the peer's bucket).
    peer = bucket(burst=1, rate=10.0, key="p/1.2.3.4")
    assert store.admit([peer], cost=1, now=T0, account="alice").admitted
    assert store.admit([peer], cost=1, now=T0 + 0.1, account="alice").admitted
    # Other accounts keep the full rate.
    other = bucket(burst=1, rate=10.0, key="a/bob", acct="bob")
    assert store.admit([other], cost=1, now=T0, account="bob").admitted
    assert store.admit([other], cost=1, now=T0 + 0.1, account="bob").admitted
    # After expiry the full rate is back.
    assert store.admit([b], cost=1, now=T0 + 200, account="alice").admitted
    assert store.admit([b], cost=1, now=T0 + 200.1, account="alice").admitted


def test_suspended_and_challenged_are_refused_inside_admit(store: StateStore) -> None:
    w = window(Period.DAY, 5)
    suspended = AccountStatus.suspended(reason="r", set_by="op", set_at=T0, expires_at=T0 + 50)
    store.set_status("alice", suspended)
    blocked = store.admit([w], cost=1, now=T0, account="alice")
    assert not blocked.admitted and blocked.refused_by is None
    assert blocked.status == suspended and blocked.retry_after == pytest.approx(50)
    assert store.usage([w], now=T0)[0].remaining == 5  # nothing consumed
    assert store.admit([w], cost=1, now=T0 + 50, account="alice").admitted  # expired
    challenged = AccountStatus.challenged(8, reason="r", set_by="op", set_at=T0)
    store.set_status("alice", challenged)
    for work in (0, 7):
        r = store.admit([w], cost=1, now=T0 + 60, account="alice", work=work)
        assert not r.admitted and r.refused_by is None and r.status == challenged
        assert r.retry_after is None
    r = store.admit([w], cost=1, now=T0 + 60, account="alice", work=8)
    assert r.admitted and r.status == challenged and r.remaining[0].remaining == 3
    # Without ``account`` no status applies.
    assert store.admit([w], cost=1, now=T0 + 60).admitted


def test_status_expiry_and_history(store: StateStore) -> None:
    assert store.get_status("alice", now=T0).kind is Status.NORMAL
    assert store.status_history("alice") == []
    s1 = AccountStatus.challenged(
        8, reason="sweep", set_by="detector", set_at=T0, expires_at=T0 + 60
    )
    store.set_status("alice", s1)
    assert store.get_status("alice", now=T0 + 59) == s1
    assert store.get_status("alice", now=T0 + 60).kind is Status.NORMAL
    s2 = AccountStatus.suspended(reason="abuse", set_by="op:carol", set_at=T0 + 1)
    store.set_status("alice", s2)
    assert store.get_status("alice", now=T0 + 10**9) == s2
    s3 = AccountStatus.normal(reason="appeal", set_by="op:carol", set_at=T0 + 2)
    store.set_status("alice", s3)
    assert store.get_status("alice", now=T0 + 3) == s3
    assert store.status_history("alice") == [s3, s2, s1]
    assert store.status_history("bob") == []


def test_usage_and_reset(store: StateStore) -> None:
    checks = [bucket(burst=5), window(Period.MINUTE, 10), window(Period.DAY, 100)]
    for _ in range(3):
        store.admit(checks, cost=1, now=T0)
    assert [u.remaining for u in store.usage(checks, now=T0)] == [2, 7, 97]
    # usage consumes nothing
    assert [u.remaining for u in store.usage(checks, now=T0)] == [2, 7, 97]
    store.reset(checks[1:], now=T0)
    assert [u.remaining for u in store.usage(checks, now=T0)] == [2, 10, 100]
    store.reset(checks, now=T0)
    assert [u.remaining for u in store.usage(checks, now=T0)] == [5, 10, 100]


def test_blobs(store: StateStore) -> None:
    assert store.get_blob("det/alice") is None
    store.put_blob("det/alice", b"\x00state", ttl_s=None)
    assert store.get_blob("det/alice") == b"\x00state"
    store.put_blob("det/alice", b"v2", ttl_s=60)
    assert store.get_blob("det/alice") == b"v2"
    store.put_blob("short", b"x", ttl_s=0.05)
    time.sleep(0.15)
    assert store.get_blob("short") is None


def test_consume_once(store: StateStore) -> None:
    assert store.consume_once("pow/n1", ttl_s=60) is True
    assert store.consume_once("pow/n1", ttl_s=60) is False
    assert store.consume_once("pow/n2", ttl_s=60) is True
    assert store.consume_once("pow/n3", ttl_s=0.05) is True
    time.sleep(0.15)
    assert store.consume_once("pow/n3", ttl_s=60) is True


def test_all_backends_answer_identically(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A seeded random sequence of admits gives the same results on every store."""
    kinds = ("memory", "sqlite", "redis", "redis-cluster")
    stores = [make_store(k, tmp_path, request) for k in kinds]
    rng = random.Random(6)
    accounts = ["alice", "bob", "c:d", "dave", "erin"]
    for s in stores:
        s.set_status(
            "bob",
            AccountStatus.throttled(0.25, reason="t", set_by="t", set_at=T0, expires_at=T0 + 300),
        )
        s.set_status(
            "dave",
            AccountStatus.challenged(4, reason="c", set_by="t", set_at=T0, expires_at=T0 + 900),
        )
        s.set_status(
            "erin", AccountStatus.suspended(reason="s", set_by="t", set_at=T0, expires_at=T0 + 200)
        )
    now = T0
    for _ in range(400):
        now += rng.choice([0.0, 0.01, 0.3, 1.7, 45.0])
        acct = rng.choice(accounts)
        checks = [
            bucket(burst=4, rate=0.7, key=f"a/{acct}", acct=acct),
            window(Period.MINUTE, 9, key=f"a/{acct}"),
            window(Period.DAY, 60, key=f"a/{acct}"),
            window(Period.MINUTE, 15, key="m/model"),
        ]
        cost = rng.choice([1, 1, 1, 2, 5])
        work = rng.choice([0, 4])
        results = [s.admit(checks, cost=cost, now=now, account=acct, work=work) for s in stores]
        assert all(r == results[0] for r in results[1:]), (now, acct, cost)
    for s in stores:
        s.close()


def test_admit_async_answers_like_admit(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The serving path's awaited admit (Redis: the asyncio client, one script per slot
    on a cluster; SQLite: worker threads) gives the blocking admit's answers."""
    kinds = ("memory", "sqlite", "redis", "redis-cluster")
    reference = make_store("memory", tmp_path, request)
    stores = []
    for kind in kinds:
        (tmp_path / kind).mkdir()
        stores.append(make_store(kind, tmp_path / kind, request))
    rng = random.Random(7)
    calls = []
    now = T0
    for _ in range(120):
        now += rng.choice([0.0, 0.01, 0.3, 45.0])
        acct = rng.choice(["alice", "bob"])
        checks = [
            bucket(burst=4, rate=0.7, key=f"a/{acct}", acct=acct),
            window(Period.MINUTE, 9, key=f"a/{acct}"),
            window(Period.MINUTE, 12, key="m/model"),
        ]
        calls.append((checks, rng.choice([1, 2, 5]), now, acct))
    expected = [reference.admit(c, cost=k, now=t, account=a) for c, k, t, a in calls]

    async def run(s: StateStore) -> list[object]:
        return [
            await s.admit_async(c, cost=k, now=t, account=a, deadline_s=5.0) for c, k, t, a in calls
        ]

    for kind, s in zip(kinds, stores, strict=True):
        assert asyncio.run(run(s)) == expected, kind
        s.close()
