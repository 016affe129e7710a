"""Backend-specific behaviour: SQLite restart persistence, Redis fail-closed, fail-open."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from sealserve.defense.limits import Period
from sealserve.defense.status import AccountStatus, Status
from sealserve.defense.store.base import AdmitResult, Check, UnsafeFailOpen
from sealserve.defense.store.factory import open_store
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore
from sealserve.errors import ConfigError, UnavailableError
from tests.defense.conftest import RedisClusterServers, RedisServer, free_port

T0 = 1_700_000_000.0
DAY = Check("account.day", "account daily quota", "a/alice", 3, period=Period.DAY)


def test_sqlite_quota_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    for _ in range(3):
        assert store.admit([DAY], cost=1, now=T0).admitted
    store.set_status("bob", AccountStatus.suspended(reason="r", set_by="op", set_at=T0))
    store.close()
    reopened = SqliteStore(path)
    refused = reopened.admit([DAY], cost=1, now=T0 + 1)
    assert not refused.admitted and refused.refused_by == DAY
    assert reopened.get_status("bob", now=T0).kind is Status.SUSPENDED
    reopened.close()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    import sqlite3

    SqliteStore(tmp_path / "s.db").close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_sqlite_unreachable_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="state store unreachable: sqlite"):
        SqliteStore(tmp_path / "no" / "such" / "dir" / "state.db")


def test_redis_fails_closed_and_recovers(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, prefix="fc", timeout_s=0.5)
    assert store.admit([DAY], cost=1, now=T0).admitted
    own_redis.stop()
    with pytest.raises(UnavailableError, match="state store unreachable: redis"):
        store.admit([DAY], cost=1, now=T0)
    with pytest.raises(UnavailableError, match="state store unreachable: redis"):
        store.get_status("alice", now=T0)
    with pytest.raises(UnavailableError, match="state store unreachable: redis"):
        store.consume_once("n", ttl_s=1)
    own_redis.start()  # same port, empty (no persistence): the script must be reloaded
    assert store.admit([DAY], cost=1, now=T0).admitted
    store.close()


def test_redis_never_reachable(tmp_path: Path) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    with pytest.raises(UnavailableError, match="state store unreachable: redis"):
        store.admit([DAY], cost=1, now=T0)


def test_redis_keys_are_prefixed_tagged_and_expire(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="pfx-test")
    bucket = Check("account.rate", "account rate limit", "a/alice", 5, rate=1.0)
    peer = Check("peer.rate", "peer rate limit", "p/203.0.113.9", 5, rate=1.0)
    store.admit([bucket, DAY, peer], cost=1, now=T0)
    store.put_blob("det", b"x", ttl_s=None)
    store.set_status("al{i}ce", AccountStatus.normal())
    raw = redis.Redis.from_url(redis_server.url)
    keys = {k.decode() for k in raw.keys("pfx-test:*")}
    day, rate = (
        f"pfx-test:{{a/alice}}:a/alice/day/{int(T0 - T0 % 86400)}",
        "pfx-test:{a/alice}:a/alice/rate",
    )
    peer_rate = "pfx-test:{p/203.0.113.9}:p/203.0.113.9/rate"
    # Each subject's keys carry it as a hash tag: one slot per account (status included).
    assert keys == {
        "pfx-test:blob:det",
        day,
        rate,
        peer_rate,
        "pfx-test:{a/al%7Bi%7Dce}:h",  # a brace in a name cannot move the tag
        "pfx-test:{a/al%7Bi%7Dce}:s",
    }
    for key in day, rate, peer_rate:
        assert raw.pttl(key) > 0
    assert raw.pttl("pfx-test:blob:det") == -1
    raw.close()
    store.close()


def test_redis_prefix_with_brace_refused() -> None:
    with pytest.raises(ConfigError, match="without spaces or braces, got 'a{b}'"):
        RedisStore(redis.Redis(), prefix="a{b}")


def test_unsafe_fail_open_admits_and_warns(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = UnsafeFailOpen(RedisStore.from_url(own_redis.url, prefix="fo", timeout_s=0.5))
    own_redis.stop()
    with caplog.at_level(logging.WARNING):
        assert store.admit([DAY], cost=1, now=T0).admitted
        assert store.admit([DAY], cost=1, now=T0).admitted
        assert store.get_status("alice", now=T0).kind is Status.NORMAL
    loud = [r for r in caplog.records if "UNSAFE FAIL-OPEN" in r.getMessage()]
    assert len(loud) == 3
    with pytest.raises(UnavailableError):
        store.consume_once("n", ttl_s=1)


def test_redis_reloads_flushed_script(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="flush")
    assert store.admit([DAY], cost=1, now=T0).admitted
    raw = redis.Redis.from_url(redis_server.url)
    raw.script_flush()
    raw.close()
    r = store.admit([DAY], cost=1, now=T0)  # EVALSHA fails, the script is loaded again
    assert r.admitted and r.remaining[0].remaining == 1
    store.close()


def test_redis_error_answer_fails_closed(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, prefix="ro")
    raw = redis.Redis.from_url(own_redis.url)
    raw.config_set("maxmemory", "1")  # every write now answers OOM
    raw.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(UnavailableError, match=r"state store failed: redis: .*maxmemory"):
        store.admit([DAY], cost=1, now=T0)
    raw.config_set("maxmemory", "0")
    assert store.admit([DAY], cost=1, now=T0).admitted
    raw.close()
    store.close()


def test_cluster_admit_spans_slots_and_gives_back_on_refusal(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore.from_url(redis_cluster.url, prefix="cl")
    assert store.cluster
    acct = Check("account.day", "account daily quota", "a/alice", 5, period=Period.DAY)
    model = Check("model.day", "model daily quota", "m/digits", 2, period=Period.DAY)
    # The two subjects sit on different masters: an admit cannot be one script.
    slots = {key_slot(f"{{{c.group}}}".encode()) for c in (acct, model)}
    owners = {redis_cluster.owner(slot) for slot in slots}
    assert len(owners) == 2
    for _ in range(2):
        assert store.admit([acct, model], cost=1, now=T0, account="alice").admitted
    refused = store.admit([acct, model], cost=1, now=T0, account="alice")
    assert not refused.admitted and refused.refused_by == model
    # The account's slot consumed first, then gave it back when the model refused.
    assert store.usage([acct], now=T0)[0].remaining == 3
    store.set_status("alice", AccountStatus.suspended(reason="r", set_by="t", set_at=T0))
    assert store.get_status("alice", now=T0).kind is Status.SUSPENDED
    assert [s.kind for s in store.status_history("alice")] == [Status.SUSPENDED]
    blocked = store.admit([acct, model], cost=1, now=T0 + 86400, account="alice")
    assert not blocked.admitted and blocked.status is not None
    store.reset([acct, model], now=T0)
    assert store.usage([acct, model], now=T0)[1].remaining == 2
    store.close()


def test_cluster_url_in_factory(redis_cluster: RedisClusterServers) -> None:
    store = open_store(redis_cluster.url, prefix="fac")
    assert isinstance(store, RedisStore) and store.cluster
    assert store.admit([DAY], cost=1, now=T0).admitted
    store.close()


def test_legacy_single_node_keys_are_migrated(redis_server: RedisServer) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    suspended = AccountStatus.suspended(reason="r", set_by="t", set_at=T0)
    day = f"mig:a/alice/day/{int(T0 - T0 % 86400)}"
    raw.set(day, 3, px=60_000)
    raw.hset("mig:s:al:ice", mapping={"kind": "suspended", "factor": "", "difficulty": "",
                                      "expires": "", "json": suspended.to_json()})  # fmt: skip
    raw.lpush("mig:h:al:ice", suspended.to_json())
    raw.set("mig:am/bob/digits/rate", 1)
    raw.set("mig:blob:det", b"x")
    store = RedisStore.from_url(redis_server.url, prefix="mig")
    assert store.get_status("al:ice", now=T0).kind is Status.NORMAL  # the old name is unseen
    assert store.migrate_legacy_keys() == 4
    assert store.get_status("al:ice", now=T0).kind is Status.SUSPENDED
    assert len(store.status_history("al:ice")) == 1
    assert store.usage([DAY], now=T0)[0].remaining == 0  # 3 of 3 used, as before
    assert 0 < raw.pttl(f"mig:{{a/alice}}:{day.removeprefix('mig:')}") <= 60_000
    assert raw.exists("mig:{a/bob}:am/bob/digits/rate") and raw.get("mig:blob:det") == b"x"
    assert store.migrate_legacy_keys() == 0
    raw.close()
    store.close()


def test_an_upgraded_server_sees_an_old_suspension(redis_server: RedisServer) -> None:
    """The attacker's upgrade window: an account suspended under the old key names must
    stay suspended for a server of this version, with nobody running a migration."""
    raw = redis.Redis.from_url(redis_server.url)
    suspended = AccountStatus.suspended(reason="r", set_by="t", set_at=T0)
    raw.hset("up:s:mallory", mapping={"kind": "suspended", "factor": "", "difficulty": "",
                                      "expires": "", "json": suspended.to_json()})  # fmt: skip
    store = open_store(redis_server.url, prefix="up")
    assert store.get_status("mallory", now=T0).kind is Status.SUSPENDED
    assert raw.get("up:schema") == b"2"
    assert isinstance(store, RedisStore) and store.ensure_schema() == 0  # once
    raw.close()
    store.close()


def test_sqlite_held_by_another_process_fails_admission_within_deadline(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    assert store.admit([DAY], cost=1, now=T0).admitted
    other = sqlite3.connect(str(tmp_path / "s.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

    async def scenario() -> tuple[float, int, AdmitResult]:
        ticks = 0

        async def ticker() -> None:  # the event loop must keep running meanwhile
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        with pytest.raises(UnavailableError, match=r"^state store did not answer within 0.3 s$"):
            await store.admit_async([DAY], cost=1, now=T0, deadline_s=0.3)
        took = time.perf_counter() - t0
        counted = ticks
        # Released before the deadline: the worker thread's admission goes through.
        asyncio.get_running_loop().call_later(0.1, other.execute, "ROLLBACK")
        ok = await store.admit_async([DAY], cost=1, now=T0, deadline_s=2.0)
        tick.cancel()
        return took, counted, ok

    took, ticks, ok = asyncio.run(scenario())
    # Not timing targets: a wait for the lock would take SQLite's 5 s busy timeout, and a
    # blocked loop would not tick at all (~30 ticks of 10 ms on a quiet machine).
    assert took < 0.3 + 2.0
    assert ticks >= 5
    # The refused admission's thread was still waiting for the lock and went through
    # when it was released: counted though refused (fail closed: lost, never extra).
    assert ok.admitted and ok.remaining[0].remaining == 0
    other.close()
    store.close()
