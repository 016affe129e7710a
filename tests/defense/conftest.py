"""Fixtures for the defense tests: every state store (a real redis-server on loopback
among them), and one BLAS/OpenMP thread (the machine is shared and oversubscribed
threads make scikit-learn 100x slower)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from sealserve.defense.store.base import StateStore
from sealserve.defense.store.memory import MemoryStore
from sealserve.defense.store.redis import RedisStore
from sealserve.defense.store.sqlite import SqliteStore
from tests._redis import (  # noqa: F401 (re-exported for tests)
    RedisClusterServers,
    RedisServer,
    free_port,
)

_prefix_counter = iter(range(1_000_000))


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> StateStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(tmp_path / "state.db")
    if kind == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return RedisStore.from_url(cluster.url, prefix=f"t{next(_prefix_counter)}")
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisStore.from_url(server.url, prefix=f"t{next(_prefix_counter)}")


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """Each backend in turn: the conformance suite runs against all of them (Redis
    Cluster: three masters, so an admit's account, peer and model land in different
    slots)."""
    s = make_store(request.param, tmp_path, request)
    yield s
    s.close()
