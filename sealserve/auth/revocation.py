"""Revoked token ids and suspended accounts.

A :class:`RevocationList` is anything with ``is_revoked(token_id)`` and
``is_suspended(account)``: here an in-memory one (tests, single process) and a
file-backed one. Suspensions shared by every replica live in the quota state store's
account statuses (``sealserve admin suspend``).

The file format (JSON)::

    {"format": "sealserve-revocations", "version": 1,
     "revoked_token_ids": ["<jti>", ...],
     "suspended_accounts": ["<sub>", ...]}

Replace the file atomically (write a temporary file, then rename): it is re-read when
its mtime or size changes, and an unreadable file fails closed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from sealserve.errors import ConfigError, UnavailableError

logger = logging.getLogger("sealserve.auth")

FILE_FORMAT = "sealserve-revocations"
FILE_VERSION = 1


class RevocationList(Protocol):
    """Answers whether a token id is revoked and whether an account is suspended.

    Both methods may raise :class:`sealserve.errors.UnavailableError` when the answer
    cannot be known; callers must then refuse the request.
    """

    def is_revoked(self, token_id: str) -> bool: ...

    def is_suspended(self, account: str) -> bool: ...


class InMemoryRevocationList:
    """A thread-safe in-process revocation list."""

    def __init__(
        self, *, revoked_token_ids: Iterable[str] = (), suspended_accounts: Iterable[str] = ()
    ) -> None:
        self._lock = threading.Lock()
        self._revoked = frozenset(revoked_token_ids)
        self._suspended = frozenset(suspended_accounts)

    def is_revoked(self, token_id: str) -> bool:
        return token_id in self._revoked

    def is_suspended(self, account: str) -> bool:
        return account in self._suspended

    def revoke(self, token_id: str) -> None:
        """Refuse ``token_id`` from now on."""
        with self._lock:
            self._revoked = self._revoked | {token_id}

    def suspend(self, account: str) -> None:
        """Refuse every token of ``account`` from now on."""
        with self._lock:
            self._suspended = self._suspended | {account}

    def reinstate(self, account: str) -> None:
        """Lift the suspension of ``account``."""
        with self._lock:
            self._suspended = self._suspended - {account}


def dump_revocations(
    path: Path, *, revoked_token_ids: Iterable[str] = (), suspended_accounts: Iterable[str] = ()
) -> None:
    """Write a revocation file atomically (temporary file, then rename)."""
    document = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "revoked_token_ids": sorted(set(revoked_token_ids)),
        "suspended_accounts": sorted(set(suspended_accounts)),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def _parse(document: Any, origin: str) -> tuple[frozenset[str], frozenset[str]]:
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise ConfigError(f"{origin}: not a sealserve revocation file")
    if document.get("version") != FILE_VERSION:
        raise ConfigError(f"{origin}: unsupported version {document.get('version')!r}")
    out = []
    for field in ("revoked_token_ids", "suspended_accounts"):
        values = document.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{origin}: {field!r} must be a list of strings")
        out.append(frozenset(values))
    return out[0], out[1]


class FileRevocationList:
    """Revocations read from a JSON file, re-read when it changes.

    The file is stat'ed at most once per ``check_interval`` seconds.

    Raises (from the constructor):
        ConfigError: the file is missing or invalid.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._error: str | None = None
        self._stamp: tuple[int, int] | None = None
        try:
            self._revoked, self._suspended = self._read()
        except UnavailableError as exc:
            raise ConfigError(exc.message) from exc
        self._last_check = clock()

    def _read(self) -> tuple[frozenset[str], frozenset[str]]:
        try:
            st = self.path.stat()
            document = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UnavailableError(f"cannot read revocation file {self.path}: {exc}") from exc
        try:
            parsed = _parse(document, str(self.path))
        except ConfigError as exc:
            raise UnavailableError(exc.message) from exc
        self._stamp = (st.st_mtime_ns, st.st_size)
        return parsed

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._last_check < self._check_interval:
            return
        with self._lock:
            if now - self._last_check < self._check_interval:
                return
            self._last_check = now
            try:
                st = self.path.stat()
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp is not None and stamp == self._stamp and self._error is None:
                return
            try:
                self._revoked, self._suspended = self._read()
                self._error = None
            except UnavailableError as exc:
                # Fail closed: without a readable list we cannot tell who is revoked.
                if self._error is None:
                    logger.error("revocation list: %s; refusing requests until fixed", exc)
                self._error = exc.message

    def _check(self) -> None:
        self._refresh()
        if self._error is not None:
            raise UnavailableError("the revocation list is unavailable")

    def is_revoked(self, token_id: str) -> bool:
        self._check()
        return token_id in self._revoked

    def is_suspended(self, account: str) -> bool:
        self._check()
        return account in self._suspended
