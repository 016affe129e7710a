"""The shipped Redis (deploy/k8s/50-redis.yaml) keeps state across a restart: a real
redis-server on loopback runs with the manifest's own persistence arguments, is killed
without warning, and comes back with every suspension and all quota but the last
second's (the documented recovery point of ``appendfsync everysec``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from sealserve.defense.limits import Period
from sealserve.defense.status import AccountStatus, Status
from sealserve.defense.store.base import Check
from sealserve.defense.store.factory import open_store
from tests._redis import REDIS_SERVER, RedisServer

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 100_000


def shipped_persistence_args() -> list[str]:
    """The manifest's redis-server arguments that decide persistence (not the password,
    the data directory or the network settings, which the test supplies)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/50-redis.yaml").read_text()))
    (deploy,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    keep: list[str] = []
    i = 0
    while i < len(args):
        name = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        if name not in ("--requirepass", "--dir", "--protected-mode"):
            keep += [name] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    return keep


def test_shipped_redis_persists_with_an_aof_every_second() -> None:
    args = shipped_persistence_args()
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"


def _quota() -> Check:
    return Check("account.day", "account day quota", "a/alice", LIMIT, period=Period.DAY)


def _used(store: object, now: float) -> int:
    (left,) = store.usage([_quota()], now=now)  # type: ignore[attr-defined]
    return LIMIT - int(left.remaining)


@pytest.mark.parametrize("stop", ["crash", "restart"])
def test_redis_restart_keeps_suspensions_and_all_but_one_second_of_quota(
    tmp_path: Path, stop: str
) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it via apt)")
    server = RedisServer(tmp_path, persistence=shipped_persistence_args())
    server.start()
    try:
        store = open_store(server.url, prefix="persist")
        now = time.time()
        store.set_status(
            "mallory", AccountStatus.suspended(reason="operator", set_by="op", set_at=now)
        )
        for _ in range(100):
            assert store.admit([_quota()], cost=1, now=time.time()).admitted
        time.sleep(1.5)  # past the once-a-second fsync: all of the above is on disk
        last_second = 0
        t0 = time.monotonic()
        for _ in range(500):  # written in the last second before the stop
            if time.monotonic() - t0 > 0.5:
                break
            assert store.admit([_quota()], cost=1, now=time.time()).admitted
            last_second += 1
        before = _used(store, time.time())
        assert before == 100 + last_second
        store.close()
        server.crash() if stop == "crash" else server.stop()
        server.start()  # same port, same directory: it replays the append-only file
        store = open_store(server.url, prefix="persist")
        status = store.get_status("mallory", now=time.time())
        assert status.kind is Status.SUSPENDED, "a suspension was lost"
        after = _used(store, time.time())
        if stop == "restart":
            assert after == before  # a clean shutdown loses nothing
        else:
            assert before - last_second <= after <= before  # at most the last second
        store.close()
    finally:
        server.stop()
