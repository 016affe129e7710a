"""Backend-specific behaviour: SQLite restart persistence, Redis fail-closed, fail-open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from sealserve.defense.limits import Period
from sealserve.defense.status import AccountStatus, Status
from sealserve.defense.store.base import Check, UnsafeFailOpen
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore
from sealserve.errors import UnavailableError
from tests.defense.conftest import RedisServer, free_port

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


def test_redis_keys_are_prefixed_and_expire(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="pfx-test")
    bucket = Check("account.rate", "account rate limit", "a/alice", 5, rate=1.0)
    store.admit([bucket, DAY], cost=1, now=T0)
    store.put_blob("det", b"x", ttl_s=None)
    raw = redis.Redis.from_url(redis_server.url)
    keys = sorted(k.decode() for k in raw.keys("pfx-test:*"))
    assert keys == [
        f"pfx-test:a/alice/day/{int(T0 - T0 % 86400)}",
        "pfx-test:a/alice/rate",
        "pfx-test:blob:det",
    ]
    for key in keys[0], keys[1]:
        assert raw.pttl(key) > 0
    assert raw.pttl("pfx-test:blob:det") == -1
    raw.close()
    store.close()


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
