"""In-process state store: thread-safe, forgets everything when the process exits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sealserve.defense.status import AccountStatus
from sealserve.defense.store.base import HISTORY_LIMIT, TransactionalStore, Txn


class _MemoryTxn:
    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def read(
        self, bucket_keys: Sequence[str], window_keys: Sequence[str], account: str | None
    ) -> tuple[dict[str, tuple[float, float]], dict[str, int], AccountStatus | None]:
        b, w = self._s._buckets, self._s._windows
        return (
            {k: b[k] for k in bucket_keys if k in b},
            {k: w[k] for k in window_keys if k in w},
            None if account is None else self._s._status.get(account),
        )

    def write(
        self,
        buckets: Sequence[tuple[str, float, float, float]],
        windows: Sequence[tuple[str, int, float]],
    ) -> None:
        for key, tokens, ts, _ in buckets:
            self._s._buckets[key] = (tokens, ts)
        for key, count, _ in windows:
            self._s._windows[key] = count

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._s._buckets.pop(key, None)
            self._s._windows.pop(key, None)
        gone = set(keys)
        leases = self._s._leases
        for lease_id in [i for i, (ws, _) in leases.items() if any(k in gone for k, _ in ws)]:
            del leases[lease_id]

    def put_lease(
        self, lease_id: str, windows: Sequence[tuple[str, float]], units: int, expires: float
    ) -> None:
        # Held until returned (a process's memory store dies with its leases).
        self._s._leases[lease_id] = (list(windows), units)

    def take_lease(self, lease_id: str) -> tuple[list[tuple[str, float]], int] | None:
        return self._s._leases.pop(lease_id, None)


class MemoryStore(TransactionalStore):
    """A thread-safe in-memory store for tests and single-process development.

    Old windows are never read again once their period has passed; they stay in memory
    until the process exits, which is fine for the short lives this store is meant for.
    """

    blocking = False  # no I/O: the serving path calls it inline

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._windows: dict[str, int] = {}
        self._status: dict[str, AccountStatus] = {}
        self._history: dict[str, list[AccountStatus]] = {}
        self._blobs: dict[str, tuple[bytes, float | None]] = {}
        self._once: dict[str, float] = {}
        self._leases: dict[str, tuple[list[tuple[str, float]], int]] = {}

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        with self._lock:
            yield _MemoryTxn(self)

    def get_status(self, account: str, *, now: float) -> AccountStatus:
        with self._lock:
            status = self._status.get(account)
        if status is None or not status.active_at(now):
            return AccountStatus.normal()
        return status

    def set_status(self, account: str, status: AccountStatus) -> None:
        with self._lock:
            self._status[account] = status
            history = self._history.setdefault(account, [])
            history.insert(0, status)
            del history[HISTORY_LIMIT:]

    def status_history(self, account: str) -> list[AccountStatus]:
        with self._lock:
            return list(self._history.get(account, []))

    def get_blob(self, key: str) -> bytes | None:
        with self._lock:
            item = self._blobs.get(key)
            if item is None:
                return None
            if item[1] is not None and time.monotonic() >= item[1]:
                del self._blobs[key]
                return None
            return item[0]

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        expires = None if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._blobs[key] = (bytes(value), expires)

    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            expires = self._once.get(key)
            if expires is not None and now < expires:
                return False
            self._once[key] = now + ttl_s
            if len(self._once) > 4096:
                # Bound memory: drop nonces whose replay window has closed.
                self._once = {k: v for k, v in self._once.items() if v > now}
            return True
