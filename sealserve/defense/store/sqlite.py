"""SQLite state store: the embedded default.

One database file, WAL mode, ``BEGIN IMMEDIATE`` around every admit (one transaction per
admit), and a busy timeout, so several server processes on one machine share limits
exactly. State survives restarts. ``synchronous=NORMAL``: a committed admit survives a
process crash; the last few may be lost on power loss, which only forgets usage.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

from sealserve.defense.status import AccountStatus
from sealserve.defense.store.base import (
    HISTORY_LIMIT,
    AdmitResult,
    Check,
    StoreBusy,
    TransactionalStore,
    Txn,
)
from sealserve.errors import UnavailableError

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, a REAL NOT NULL, b REAL,
    expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status (account TEXT PRIMARY KEY, json TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_account ON history (account, id);
CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS once (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id TEXT NOT NULL, key TEXT NOT NULL, state_expires REAL
    NOT NULL, units INTEGER NOT NULL, expires REAL NOT NULL, PRIMARY KEY (id, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_key ON leases (key);
"""
#: Expired rows are purged every this many write transactions of one process.
PURGE_EVERY = 2000


class _SqliteTxn:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    # One table holds buckets (a = tokens, b = timestamp) and windows (a = count,
    # b = NULL), so an admit is one SELECT and one write: the per-admit
    # CPU budget is tight (bench/bench_quota.py).
    def read(
        self, bucket_keys: Sequence[str], window_keys: Sequence[str], account: str | None
    ) -> tuple[dict[str, tuple[float, float]], dict[str, int], AccountStatus | None]:
        keys = [*bucket_keys, *window_keys]
        params: list[str] = list(keys)
        parts = []
        if keys:
            marks = ",".join("?" * len(keys))
            parts.append(f"SELECT key, a, b FROM state WHERE key IN ({marks})")  # noqa: S608
        if account is not None:
            parts.append("SELECT '', json, NULL FROM status WHERE account = ?")
            params.append(account)
        buckets: dict[str, tuple[float, float]] = {}
        windows: dict[str, int] = {}
        status = None
        if parts:
            for key, a, b in self._c.execute(" UNION ALL ".join(parts), params):
                if key == "":
                    status = AccountStatus.from_json(a)
                elif b is None:
                    windows[key] = int(a)
                else:
                    buckets[key] = (float(a), float(b))
        return buckets, windows, status

    def write(
        self,
        buckets: Sequence[tuple[str, float, float, float]],
        windows: Sequence[tuple[str, int, float]],
    ) -> None:
        rows: list[tuple[str, float, float | None, float]] = list(buckets)
        rows += [(key, count, None, expires) for key, count, expires in windows]
        if rows:
            self._c.executemany(
                "INSERT OR REPLACE INTO state (key, a, b, expires) VALUES (?, ?, ?, ?)", rows
            )

    def delete(self, keys: Sequence[str]) -> None:
        self._c.executemany("DELETE FROM state WHERE key = ?", [(k,) for k in keys])
        self._c.executemany(
            "DELETE FROM leases WHERE id IN (SELECT id FROM leases WHERE key = ?)",
            [(k,) for k in keys],
        )

    def put_lease(
        self, lease_id: str, windows: Sequence[tuple[str, float]], units: int, expires: float
    ) -> None:
        self._c.executemany(
            "INSERT OR REPLACE INTO leases (id, key, state_expires, units, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            [(lease_id, key, state_exp, units, expires) for key, state_exp in windows],
        )

    def take_lease(self, lease_id: str) -> tuple[list[tuple[str, float]], int] | None:
        rows = self._c.execute(
            "DELETE FROM leases WHERE id = ? RETURNING key, state_expires, units", (lease_id,)
        ).fetchall()
        if not rows:
            return None
        return [(str(k), float(e)) for k, e, _ in rows], int(rows[0][2])


#: Set while an admission runs inline on the event loop: no lock may be waited for.
_INLINE: ContextVar[bool] = ContextVar("sqlite_inline", default=False)


class _Busy(StoreBusy):
    """The file or the connection is held right now (inline attempts only)."""


class SqliteStore(TransactionalStore):
    """State in one SQLite file shared by every process on the machine.

    Raises UnavailableError("state store unreachable: ...") when the file cannot be
    opened or stays locked longer than ``busy_timeout_s``.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._writes = 0
        try:
            # State is account data: created owner-only whatever the umask (SQLite
            # gives its -wal and -shm files the database file's permissions).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise UnavailableError(
                f"state store unreachable: sqlite {self.path}: {exc.strerror}"
            ) from exc
        try:
            self._conn = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._busy_ms = int(busy_timeout_s * 1000)
            self._conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self._write() as conn:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise UnavailableError(f"state store unreachable: sqlite {self.path}: {exc}") from exc

    async def admit_async(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
        deadline_s: float,
    ) -> AdmitResult:
        """Inline when the file is free this instant (it never waits for a lock there:
        a thread hop costs more CPU than the transaction); when another thread or
        process holds it, in a worker thread within ``deadline_s``."""
        token = _INLINE.set(True)
        try:
            return self.admit(checks, cost=cost, now=now, account=account, work=work)
        except _Busy:
            pass
        finally:
            _INLINE.reset(token)
        return await super().admit_async(
            checks, cost=cost, now=now, account=account, work=work, deadline_s=deadline_s
        )

    async def call_soon_async(self, fn: Callable[[], T], *, deadline_s: float) -> T:
        """Inline while nothing waits (as :meth:`admit_async`), else in a worker thread.
        ``fn`` must be safe to run again after a _Busy (leases are)."""
        token = _INLINE.set(True)
        try:
            return fn()
        except _Busy:
            pass
        finally:
            _INLINE.reset(token)
        return await self.call_async(fn, deadline_s=deadline_s)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so
        concurrent processes serialise instead of failing on lock upgrade. Inline (on
        the event loop) it waits for nothing: a held lock raises _Busy."""
        inline = _INLINE.get()
        if not self._lock.acquire(blocking=not inline):
            raise _Busy
        try:
            self._begin(inline)
            try:
                yield self._conn
                self._writes += 1
                if self._writes % PURGE_EVERY == 0:
                    self._purge()
                self._conn.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise UnavailableError(
                        f"state store unreachable: sqlite {self.path}: {exc}"
                    ) from exc
                raise
        finally:
            self._lock.release()

    def _begin(self, inline: bool) -> None:
        try:
            if inline:
                self._conn.execute("PRAGMA busy_timeout = 0")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            finally:
                if inline:
                    self._conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        except sqlite3.OperationalError as exc:
            if inline and "locked" in str(exc):
                raise _Busy from exc
            raise UnavailableError(f"state store unreachable: sqlite {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise UnavailableError(f"state store unreachable: sqlite {self.path}: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # Inline, only this process's connection lock could make a read wait (WAL
        # readers do not wait for writers): never wait for it there.
        if not self._lock.acquire(blocking=not _INLINE.get()):
            raise _Busy
        try:
            yield self._conn
        except sqlite3.Error as exc:
            raise UnavailableError(f"state store unreachable: sqlite {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    def _purge(self) -> None:
        now = time.time()
        self._conn.execute("DELETE FROM state WHERE expires < ?", (now,))
        self._conn.execute("DELETE FROM once WHERE expires < ?", (now,))
        # An unreturned lease (its replica died) expires here: its units stay counted.
        self._conn.execute("DELETE FROM leases WHERE expires < ?", (now,))
        self._conn.execute("DELETE FROM blobs WHERE expires IS NOT NULL AND expires < ?", (now,))

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        with self._write() as conn:
            yield _SqliteTxn(conn)

    def get_status(self, account: str, *, now: float) -> AccountStatus:
        with self._read() as conn:
            row = conn.execute("SELECT json FROM status WHERE account = ?", (account,)).fetchone()
        status = None if row is None else AccountStatus.from_json(row[0])
        if status is None or not status.active_at(now):
            return AccountStatus.normal()
        return status

    def set_status(self, account: str, status: AccountStatus) -> None:
        text = status.to_json()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO status (account, json) VALUES (?, ?) "
                "ON CONFLICT (account) DO UPDATE SET json = excluded.json",
                (account, text),
            )
            conn.execute("INSERT INTO history (account, json) VALUES (?, ?)", (account, text))
            conn.execute(
                "DELETE FROM history WHERE account = ? AND id NOT IN (SELECT id FROM history "
                "WHERE account = ? ORDER BY id DESC LIMIT ?)",
                (account, account, HISTORY_LIMIT),
            )

    def status_history(self, account: str) -> list[AccountStatus]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT json FROM history WHERE account = ? ORDER BY id DESC LIMIT ?",
                (account, HISTORY_LIMIT),
            ).fetchall()
        return [AccountStatus.from_json(r[0]) for r in rows]

    def get_blob(self, key: str) -> bytes | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT value FROM blobs WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, time.time()),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        expires = None if ttl_s is None else time.time() + ttl_s
        with self._write() as conn:
            conn.execute(
                "INSERT INTO blobs (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value, expires = excluded.expires",
                (key, bytes(value), expires),
            )

    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT expires FROM once WHERE key = ?", (key,)).fetchone()
            if row is not None and now < float(row[0]):
                return False
            conn.execute(
                "INSERT INTO once (key, expires) VALUES (?, ?) ON CONFLICT (key) "
                "DO UPDATE SET expires = excluded.expires",
                (key, now + ttl_s),
            )
            return True

    def close(self) -> None:
        self._close_pool()
        with self._lock:
            self._conn.close()
