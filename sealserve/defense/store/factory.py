"""Open a state store from one configuration string.

``memory:``, ``sqlite:///var/lib/sealserve/state.db`` (``sqlite://`` + a path), or
``redis://host:6379/0`` / ``rediss://...``, or ``redis+cluster://host:6379`` /
``rediss+cluster://...`` (any one node of a Redis Cluster). The server's settings,
``sealserve admin`` and ``sealserve stress`` all open stores this way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sealserve.defense.store.base import StateStore, UnsafeFailOpen
from sealserve.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)


def open_store(
    url: str,
    *,
    prefix: str = "sealserve",
    timeout_s: float = 1.0,
    unsafe_fail_open: bool = False,
) -> StateStore:
    """The store named by ``url``; wrapped in :class:`UnsafeFailOpen` (which warns on
    every use) only when ``unsafe_fail_open`` is set.

    Raises ConfigError for an unknown scheme, UnavailableError when a SQLite file cannot
    be opened (Redis connects lazily and fails closed per call).
    """
    store: StateStore
    if url == "memory:":
        from sealserve.defense.store.memory import MemoryStore

        store = MemoryStore()
    elif url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ):
        from sealserve.defense.store.redis import RedisStore

        redis_store = RedisStore.from_url(url, prefix=prefix, timeout_s=timeout_s)
        try:
            renamed = redis_store.ensure_schema()
        except UnavailableError as exc:
            # Not reachable now: every call fails closed until it is. Say what an
            # upgrade from an older version then needs.
            log.warning(
                "state store: could not check the key schema (%s); after an upgrade from "
                "a version without hash-tagged keys, restart once Redis answers",
                exc.message,
            )
        else:
            if renamed:
                log.warning("state store: renamed %d keys to the hash-tagged scheme", renamed)
        store = redis_store
    elif url.startswith("sqlite://"):
        from sealserve.defense.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if not path:
            raise ConfigError("state store url 'sqlite://' needs a file path")
        store = SqliteStore(Path(path), busy_timeout_s=max(timeout_s, 5.0))
    else:
        raise ConfigError(
            f"state store url {url!r} is not understood "
            "(use memory:, sqlite:///path/state.db, redis://host:port/db or "
            "redis+cluster://host:port)"
        )
    return UnsafeFailOpen(store) if unsafe_fail_open else store
