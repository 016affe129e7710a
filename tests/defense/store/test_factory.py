"""open_store: one string picks the backend; unknown schemes are a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealserve.defense.store.base import UnsafeFailOpen
from sealserve.defense.store.factory import open_store
from sealserve.defense.store.memory import MemoryStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore
from sealserve.errors import ConfigError


def test_schemes(tmp_path: Path) -> None:
    assert isinstance(open_store("memory:"), MemoryStore)
    s = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "a.db"
    s.close()
    r = open_store("redis://127.0.0.1:1/0", prefix="x")
    assert isinstance(r, RedisStore) and r.prefix == "x"
    wrapped = open_store("memory:", unsafe_fail_open=True)
    assert isinstance(wrapped, UnsafeFailOpen)


@pytest.mark.parametrize("url", ["postgres://db/x", "sqlite://", "memory", "/var/lib/state.db"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="state store url"):
        open_store(url)


def test_bad_redis_prefix() -> None:
    with pytest.raises(ConfigError, match="redis key prefix must be non-empty"):
        open_store("redis://127.0.0.1:1/0", prefix="a b")


def test_sqlite_state_file_is_created_owner_only(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)  # the usual umask would make it world-readable
    try:
        store = open_store(f"sqlite://{tmp_path / 'state.db'}")
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
