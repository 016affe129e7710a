"""The state store interface shared by every defense component, and its value types.

A :class:`StateStore` keeps rate-limit buckets, quota windows, account statuses, opaque
blobs and single-use nonces. Backends: :class:`~sealserve.defense.store_memory.MemoryStore`
(tests, one process), :class:`~sealserve.defense.store_sqlite.SqliteStore` (embedded
default, several processes on one machine) and
:class:`~sealserve.defense.store_redis.RedisStore` (several replicas). All three give the
same answers for the same sequence of calls (tests/defense/test_store_conformance.py).

Time: quota math uses the ``now`` the caller passes (Unix seconds), never the store's
clock, so replicas must keep their clocks in sync (NTP). Blob and nonce TTLs are wall
clock durations measured by the backend.

A store that cannot be reached raises :class:`~sealserve.errors.UnavailableError`; the
caller refuses the request (fail closed). :class:`UnsafeFailOpen` is the one, explicitly
named, way to admit anyway.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from sealserve.defense.limits import Period, window_bounds
from sealserve.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

#: Extra lifetime given to stored window/bucket state beyond the moment it stops
#: mattering, so that replicas whose clocks differ slightly agree.
STATE_SLACK_S = 3600.0
MAX_DIFFICULTY = 32
#: A bucket holding ``cost - TOKEN_EPS`` tokens admits ``cost``: float time arithmetic at
#: Unix-epoch magnitudes loses ~1e-7 s, which must not refuse a request that is on time.
#: The shortfall is carried (tokens go slightly negative), so it can never accumulate.
TOKEN_EPS = 1e-3


@dataclass(frozen=True)
class Check:
    """One limit applied to one subject for one request.

    ``period`` None means a token bucket of ``limit`` (burst) tokens refilled at
    ``rate`` per second; otherwise a fixed window of ``limit`` units. When
    ``throttle_account`` is set, a throttled status of that account multiplies ``rate``
    inside the same atomic admit.
    """

    name: str
    label: str
    key: str
    limit: int
    period: Period | None = None
    rate: float = 0.0
    throttle_account: str | None = None
    unit: str = "requests"

    def __post_init__(self) -> None:
        if self.limit <= 0:
            raise ConfigError(f"{self.label}: limit must be greater than zero")
        if self.period is None and not self.rate > 0:
            raise ConfigError(f"{self.label}: rate must be greater than zero")

    def storage_key(self, now: float) -> str:
        """The store key holding this check's state at ``now``."""
        if self.period is None:
            return f"b/{self.key}"
        start, _ = window_bounds(self.period, now)
        return f"w/{self.key}/{self.period.value}/{int(start)}"

    def describe(self) -> str:
        """Human-readable description of the refusal, for the client and the log."""
        if self.period is None:
            return f"{self.label} of {self.rate:g}/s (burst {self.limit}) exceeded"
        return f"{self.label} of {self.limit} {self.unit} exhausted"


@dataclass(frozen=True)
class Remaining:
    """What is left of one limit: ``remaining`` of ``limit`` units; the window resets (or
    the bucket is full again) ``reset_after`` seconds from now."""

    name: str
    limit: int
    remaining: int
    reset_after: float


@dataclass(frozen=True)
class AdmitResult:
    """The answer of :meth:`StateStore.admit`.

    Admitted: ``remaining`` holds every limit after this request was counted.
    Refused: nothing was consumed; ``refused_by`` is the limit that was hit and
    ``retry_after`` the seconds to wait (``None`` when waiting cannot help, e.g. a cost
    larger than the limit).
    """

    admitted: bool
    remaining: tuple[Remaining, ...]
    refused_by: Check | None = None
    retry_after: float | None = None


class StatusKind(StrEnum):
    NORMAL = "normal"
    THROTTLED = "throttled"
    CHALLENGED = "challenged"
    SUSPENDED = "suspended"


@dataclass(frozen=True)
class AccountStatus:
    """An account's graduated-response status, who set it, why, and until when.

    Build with the named constructors. ``expires_at`` None means it persists until
    changed. Raises ConfigError for a factor outside (0, 1] or a difficulty outside
    1..32.
    """

    kind: StatusKind = StatusKind.NORMAL
    factor: float | None = None
    difficulty: int | None = None
    reason: str = ""
    set_by: str = ""
    set_at: float = 0.0
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.kind is StatusKind.THROTTLED:
            if self.factor is None or not 0 < self.factor <= 1:
                raise ConfigError(f"throttle factor must be in (0, 1], got {self.factor!r}")
        elif self.factor is not None:
            raise ConfigError(f"a {self.kind} status takes no throttle factor")
        if self.kind is StatusKind.CHALLENGED:
            if not isinstance(self.difficulty, int) or not 1 <= self.difficulty <= MAX_DIFFICULTY:
                raise ConfigError(
                    f"challenge difficulty must be 1..{MAX_DIFFICULTY} bits, "
                    f"got {self.difficulty!r}"
                )
        elif self.difficulty is not None:
            raise ConfigError(f"a {self.kind} status takes no difficulty")

    @classmethod
    def normal(cls, *, reason: str = "", set_by: str = "", set_at: float = 0.0) -> AccountStatus:
        return cls(StatusKind.NORMAL, reason=reason, set_by=set_by, set_at=set_at)

    @classmethod
    def throttled(
        cls,
        factor: float,
        *,
        reason: str,
        set_by: str,
        set_at: float,
        expires_at: float | None = None,
    ) -> AccountStatus:
        return cls(
            StatusKind.THROTTLED,
            factor=factor,
            reason=reason,
            set_by=set_by,
            set_at=set_at,
            expires_at=expires_at,
        )

    @classmethod
    def challenged(
        cls,
        difficulty: int,
        *,
        reason: str,
        set_by: str,
        set_at: float,
        expires_at: float | None = None,
    ) -> AccountStatus:
        return cls(
            StatusKind.CHALLENGED,
            difficulty=difficulty,
            reason=reason,
            set_by=set_by,
            set_at=set_at,
            expires_at=expires_at,
        )

    @classmethod
    def suspended(
        cls, *, reason: str, set_by: str, set_at: float, expires_at: float | None = None
    ) -> AccountStatus:
        return cls(
            StatusKind.SUSPENDED, reason=reason, set_by=set_by, set_at=set_at, expires_at=expires_at
        )

    def active_at(self, now: float) -> bool:
        """True while the status applies (not expired at ``now``)."""
        return self.expires_at is None or now < self.expires_at

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "factor": self.factor,
                "difficulty": self.difficulty,
                "reason": self.reason,
                "set_by": self.set_by,
                "set_at": self.set_at,
                "expires_at": self.expires_at,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> AccountStatus:
        data: dict[str, Any] = json.loads(text)
        return cls(
            StatusKind(data["kind"]),
            factor=data["factor"],
            difficulty=data["difficulty"],
            reason=data["reason"],
            set_by=data["set_by"],
            set_at=data["set_at"],
            expires_at=data["expires_at"],
        )


class StateStore(ABC):
    """Where defense state lives. Every method raises UnavailableError when the store
    cannot be reached; none ever answers without having checked."""

    @abstractmethod
    def admit(self, checks: Sequence[Check], *, cost: int, now: float) -> AdmitResult:
        """Atomically check and consume ``cost`` units from every check: all or nothing."""

    @abstractmethod
    def usage(self, checks: Sequence[Check], *, now: float) -> tuple[Remaining, ...]:
        """What is left of each check at ``now``, consuming nothing."""

    @abstractmethod
    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        """Forget the consumption of each check (current window; bucket refilled)."""

    @abstractmethod
    def get_status(self, account: str, *, now: float) -> AccountStatus:
        """The account's status at ``now`` (normal when none is set or it expired)."""

    @abstractmethod
    def set_status(self, account: str, status: AccountStatus) -> None:
        """Set the account's status and append it to the account's history."""

    @abstractmethod
    def status_history(self, account: str) -> list[AccountStatus]:
        """Every status ever set for the account, newest first (at most 1000)."""

    @abstractmethod
    def get_blob(self, key: str) -> bytes | None:
        """The blob stored under ``key``, or None when absent or expired."""

    @abstractmethod
    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (None: forever)."""

    @abstractmethod
    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        """True the first time ``key`` is consumed within ``ttl_s`` seconds, else False."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


HISTORY_LIMIT = 1000


def validate_admit(checks: Sequence[Check], cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigError(f"cost must be a positive integer, got {cost!r}")


def bucket_level(
    tokens: float | None, ts: float | None, check: Check, rate: float, now: float
) -> float:
    """Tokens in the bucket at ``now`` (the Redis Lua script mirrors this exactly)."""
    if tokens is None or ts is None:
        return float(check.limit)
    return min(float(check.limit), tokens + max(0.0, now - ts) * rate)


def finish(
    checks: Sequence[Check],
    levels: Sequence[float],
    rates: Sequence[float],
    *,
    cost: int,
    now: float,
    admitted: bool,
) -> AdmitResult:
    """Turn per-check levels (bucket tokens or window counts before this request) into
    an AdmitResult. Shared by every backend so they answer identically."""
    remaining = []
    for check, level, rate in zip(checks, levels, rates, strict=True):
        if check.period is None:
            after = level - cost if admitted else level
            remaining.append(
                Remaining(
                    check.name, check.limit, max(0, math.floor(after)), (check.limit - after) / rate
                )
            )
        else:
            after = level + cost if admitted else level
            _, end = window_bounds(check.period, now)
            remaining.append(
                Remaining(check.name, check.limit, max(0, check.limit - int(after)), end - now)
            )
    if admitted:
        return AdmitResult(True, tuple(remaining))
    worst: tuple[Check, float | None] | None = None
    for check, level, rate in zip(checks, levels, rates, strict=True):
        wait: float | None
        if check.period is None:
            if level + TOKEN_EPS >= cost:
                continue
            wait = None if cost > check.limit else (cost - level) / rate
        else:
            if level + cost <= check.limit:
                continue
            wait = None if cost > check.limit else window_bounds(check.period, now)[1] - now
        if worst is None or (worst[1] is not None and (wait is None or wait > worst[1])):
            worst = (check, wait)
    assert worst is not None, "refused without a failing check"
    return AdmitResult(False, tuple(remaining), refused_by=worst[0], retry_after=worst[1])


class Txn(Protocol):
    """Primitive operations a transactional backend offers inside one transaction."""

    def get_bucket(self, key: str) -> tuple[float, float] | None: ...
    def put_bucket(self, key: str, tokens: float, ts: float, expires_at: float) -> None: ...
    def get_window(self, key: str) -> int: ...
    def put_window(self, key: str, count: int, expires_at: float) -> None: ...
    def delete(self, key: str) -> None: ...
    def get_status(self, account: str) -> AccountStatus | None: ...


class TransactionalStore(StateStore):
    """Quota logic over a backend that offers serialisable transactions (memory, SQLite).

    Subclasses provide :meth:`transaction`; this class holds the arithmetic, so the two
    backends cannot drift apart.
    """

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Txn]:
        """An exclusive read-write transaction, committed when the block exits cleanly."""

    def _levels(
        self, tx: Txn, checks: Sequence[Check], now: float
    ) -> tuple[list[float], list[float], list[tuple[float, float] | None]]:
        factors: dict[str, float] = {}
        levels: list[float] = []
        rates: list[float] = []
        raw: list[tuple[float, float] | None] = []
        for check in checks:
            key = check.storage_key(now)
            if check.period is None:
                rate = check.rate
                acct = check.throttle_account
                if acct is not None:
                    if acct not in factors:
                        st = tx.get_status(acct)
                        factors[acct] = (
                            st.factor
                            if st is not None
                            and st.kind is StatusKind.THROTTLED
                            and st.factor is not None
                            and st.active_at(now)
                            else 1.0
                        )
                    rate = rate * factors[acct]
                state = tx.get_bucket(key)
                raw.append(state)
                levels.append(
                    bucket_level(
                        state[0] if state else None, state[1] if state else None, check, rate, now
                    )
                )
                rates.append(rate)
            else:
                raw.append(None)
                levels.append(float(tx.get_window(key)))
                rates.append(0.0)
        return levels, rates, raw

    def admit(self, checks: Sequence[Check], *, cost: int, now: float) -> AdmitResult:
        validate_admit(checks, cost)
        with self.transaction() as tx:
            levels, rates, raw = self._levels(tx, checks, now)
            ok = all(
                (lv + TOKEN_EPS >= cost) if c.period is None else (lv + cost <= c.limit)
                for c, lv in zip(checks, levels, strict=True)
            )
            if ok:
                for check, level, rate, state in zip(checks, levels, rates, raw, strict=True):
                    key = check.storage_key(now)
                    if check.period is None:
                        tokens = level - cost
                        ts = now if state is None else max(state[1], now)
                        full_at = now + (check.limit - tokens) / rate
                        tx.put_bucket(key, tokens, ts, full_at + STATE_SLACK_S)
                    else:
                        _, end = window_bounds(check.period, now)
                        tx.put_window(key, int(level) + cost, end + STATE_SLACK_S)
        return finish(checks, levels, rates, cost=cost, now=now, admitted=ok)

    def usage(self, checks: Sequence[Check], *, now: float) -> tuple[Remaining, ...]:
        with self.transaction() as tx:
            levels, rates, _ = self._levels(tx, checks, now)
        # Report as a refusal-free read: nothing consumed.
        return _peek(checks, levels, rates, now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        with self.transaction() as tx:
            for check in checks:
                tx.delete(check.storage_key(now))


def _peek(
    checks: Sequence[Check], levels: Sequence[float], rates: Sequence[float], now: float
) -> tuple[Remaining, ...]:
    out = []
    for check, level, rate in zip(checks, levels, rates, strict=True):
        if check.period is None:
            out.append(
                Remaining(
                    check.name, check.limit, max(0, math.floor(level)), (check.limit - level) / rate
                )
            )
        else:
            _, end = window_bounds(check.period, now)
            out.append(
                Remaining(check.name, check.limit, max(0, check.limit - int(level)), end - now)
            )
    return tuple(out)


peek = _peek


class UnsafeFailOpen(StateStore):
    """UNSAFE: wraps a store so that quota admits and status reads succeed when the store
    is unreachable. Every such use logs a warning. Blobs, nonces, status writes and resets
    still raise. Use only when availability matters more than the limits."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        log.warning("UnsafeFailOpen enabled: quotas are NOT enforced while the store is down")

    def admit(self, checks: Sequence[Check], *, cost: int, now: float) -> AdmitResult:
        try:
            return self.inner.admit(checks, cost=cost, now=now)
        except UnavailableError as exc:
            log.warning("UNSAFE FAIL-OPEN: admitting a request unchecked: %s", exc)
            return AdmitResult(True, ())

    def usage(self, checks: Sequence[Check], *, now: float) -> tuple[Remaining, ...]:
        return self.inner.usage(checks, now=now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        self.inner.reset(checks, now=now)

    def get_status(self, account: str, *, now: float) -> AccountStatus:
        try:
            return self.inner.get_status(account, now=now)
        except UnavailableError as exc:
            log.warning("UNSAFE FAIL-OPEN: treating account status as normal: %s", exc)
            return AccountStatus.normal()

    def set_status(self, account: str, status: AccountStatus) -> None:
        self.inner.set_status(account, status)

    def status_history(self, account: str) -> list[AccountStatus]:
        return self.inner.status_history(account)

    def get_blob(self, key: str) -> bytes | None:
        return self.inner.get_blob(key)

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        self.inner.put_blob(key, value, ttl_s=ttl_s)

    def consume_once(self, key: str, *, ttl_s: float) -> bool:
        return self.inner.consume_once(key, ttl_s=ttl_s)

    def close(self) -> None:
        self.inner.close()


def iter_unique(items: Sequence[str]) -> Iterator[str]:
    seen: set[str] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item
