"""The state store interface shared by every defense component, and its value types.

Over 400 lines: the contract and the quota math every backend shares, so all agree.

A :class:`StateStore` keeps rate-limit buckets, quota windows, account statuses, opaque
blobs and single-use nonces. Backends: :class:`~sealserve.defense.store.memory.MemoryStore`
(tests, one process), :class:`~sealserve.defense.store.sqlite.SqliteStore` (embedded
default, several processes on one machine) and
:class:`~sealserve.defense.store.redis.RedisStore` (several replicas). All three give the
same answers for the same sequence of calls (tests/defense/store/test_conformance.py).

Time: quota math uses the ``now`` the caller passes (Unix seconds), never the store's
clock, so replicas must keep their clocks in sync (NTP). Blob and nonce TTLs are wall
clock durations measured by the backend.

A store that cannot be reached raises :class:`~sealserve.errors.UnavailableError`; the
caller refuses the request (fail closed). The serving path awaits the store
(:meth:`StateStore.admit_async`, :meth:`StateStore.call_async`) with a deadline, so a
hung store refuses admissions within it while the event loop keeps answering other RPCs:
Redis through redis-py's asyncio client, SQLite in the store's own worker threads.
:class:`UnsafeFailOpen` is the one, explicitly named, way to admit anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, NamedTuple, Protocol, TypeVar
from urllib.parse import quote

from sealserve.defense.limits import Period, window_bounds
from sealserve.defense.status import AccountStatus, Status
from sealserve.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Threads a blocking store (SQLite) may occupy for the serving path: a hung store ties
#: up at most these, and later calls queue (and time out) behind them.
STORE_THREADS = 4

#: Extra lifetime given to stored window/bucket state beyond the moment it stops
#: mattering, so that replicas whose clocks differ slightly agree.
STATE_SLACK_S = 3600.0
#: A bucket holding ``cost - TOKEN_EPS`` tokens admits ``cost``: float time arithmetic at
#: Unix-epoch magnitudes loses ~1e-7 s, which must not refuse a request that is on time.
#: The shortfall is carried (tokens go slightly negative), so it can never accumulate.
TOKEN_EPS = 1e-3
#: A lease takes at most this fraction of what is left of the tightest window, so an
#: account near its limit gets leases of one request (per-call exactness) and replicas
#: never hold the last units between them.
LEASE_FRACTION = 0.25


def account_group(account: str) -> str:
    """The storage group of an account's own checks and its status: ``a/<account>``,
    percent-encoded so that no account name can forge another's key."""
    return "a/" + quote(account, safe="")


@dataclass(frozen=True)
class Check:
    """One limit applied to one subject for one request.

    ``period`` None means a token bucket of ``limit`` (burst) tokens refilled at
    ``rate`` per second; otherwise a fixed window of ``limit`` units. When ``throttle`` is
    set, a throttled status of the admitted account multiplies ``rate`` inside the same
    atomic admit. ``group`` names the subject whose state this check is stored beside
    (default: ``key``); an account's checks, per-model ones included, are in the
    account's group (:func:`account_group`), with its status. On Redis Cluster a group is
    one hash slot.
    """

    name: str
    label: str
    key: str
    limit: int
    period: Period | None = None
    rate: float = 0.0
    throttle: bool = False
    unit: str = "requests"
    group: str = ""
    prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Storage keys are built per admit; precompute the constant part once. The
        # subject comes first so that one account's state sits together (SQLite pages).
        object.__setattr__(
            self,
            "prefix",
            f"{self.key}/rate" if self.period is None else f"{self.key}/{self.period.value}/",
        )
        if not self.group:
            object.__setattr__(self, "group", self.key)
        if self.limit <= 0:
            raise ConfigError(f"{self.label}: limit must be greater than zero")
        if self.period is None and not self.rate > 0:
            raise ConfigError(f"{self.label}: rate must be greater than zero")

    def describe(self) -> str:
        """Human-readable description of the refusal, for the client and the log."""
        if self.period is None:
            return f"{self.label} of {self.rate:g}/s (burst {self.limit}) exceeded"
        return f"{self.label} of {self.limit} {self.unit} exhausted"


class Remaining(NamedTuple):
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
    larger than the limit). Refused with ``refused_by`` None: the account's ``status``
    (suspended, or challenged without enough work) refused it before any limit.
    ``status`` is the admitted account's active status (None: normal or no account).
    """

    admitted: bool
    remaining: tuple[Remaining, ...]
    refused_by: Check | None = None
    retry_after: float | None = None
    status: AccountStatus | None = None


class StoreBusy(Exception):
    """Raised by a call made inline on the event loop that would have had to wait: the
    store did nothing, so the call may safely run again elsewhere."""


@dataclass(frozen=True)
class LeaseAsk:
    """What a replica asks of :meth:`StateStore.lease`: admit a request of ``cost`` for
    ``account`` at ``now`` and reserve up to ``want`` units in all (the request's
    included), recorded as ``lease_id`` for at most ``lease_s`` seconds."""

    cost: int
    want: int
    now: float
    account: str
    lease_id: str
    lease_s: float


@dataclass(frozen=True)
class Lease:
    """Units of an account's quota windows reserved in the store for one replica
    (:meth:`StateStore.lease`): already counted in every window, so the replica may
    admit up to ``units`` more requests' cost locally until ``expires_at`` (the lease's
    end or the first window's end, whichever is first). ``remaining`` is every limit
    as the store saw it after the reservation."""

    lease_id: str
    units: int
    expires_at: float
    remaining: tuple[Remaining, ...]


async def with_deadline(call: Awaitable[T], deadline_s: float) -> T:
    """``await call``, or raise UnavailableError when it takes longer than
    ``deadline_s`` seconds (the call is cancelled where it can be)."""
    try:
        # asyncio.timeout, not wait_for: no task is made per call on the hot path.
        async with asyncio.timeout(deadline_s):
            return await call
    except TimeoutError as exc:
        raise UnavailableError(
            f"state store did not answer within {deadline_s:g} s", retry_after=1.0
        ) from exc


class StateStore(ABC):
    """Where defense state lives. Every method raises UnavailableError when the store
    cannot be reached; none ever answers without having checked."""

    #: Whether calls wait on I/O (a file, a network). The awaitable calls run a blocking
    #: store's methods in its own worker threads; a store without I/O answers inline.
    blocking: ClassVar[bool] = True
    _pool: ThreadPoolExecutor | None = None

    async def call_async(self, fn: Callable[[], T], *, deadline_s: float) -> T:
        """``fn()`` (a call of this store's blocking methods) awaited: off the event loop
        in the store's worker threads, answered within ``deadline_s`` seconds or
        UnavailableError."""
        if not self.blocking:
            return fn()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="state-store")
        loop = asyncio.get_running_loop()
        return await with_deadline(loop.run_in_executor(self._pool, fn), deadline_s)

    async def call_soon_async(self, fn: Callable[[], T], *, deadline_s: float) -> T:
        """:meth:`call_async`, but inline on the event loop when the store can answer
        without waiting (SQLite: its file is free this instant)."""
        return await self.call_async(fn, deadline_s=deadline_s)

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
        """:meth:`admit`, awaited with a deadline (UnavailableError when it passes)."""
        call = partial(self.admit, checks, cost=cost, now=now, account=account, work=work)
        return await self.call_async(call, deadline_s=deadline_s)

    @abstractmethod
    def admit(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
    ) -> AdmitResult:
        """Atomically check and consume ``cost`` units from every check: all or nothing.

        With ``account``, the account's status is read in the same atomic step: a
        suspended account, or a challenged one whose verified proof of work ``work``
        (bits) is below the required difficulty, is refused before any limit; a
        throttled one has the rate of its ``throttle`` checks multiplied by its factor.
        Raises ConfigError for a cost that is not a positive integer.
        """

    @abstractmethod
    def usage(
        self, checks: Sequence[Check], *, now: float, account: str | None = None
    ) -> tuple[Remaining, ...]:
        """What is left of each check at ``now`` (throttled by ``account``'s status),
        consuming nothing."""

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

    #: Whether :meth:`lease` can reserve units (False: every admit is per call).
    leases: bool = False

    def lease(
        self, checks: Sequence[Check], ask: LeaseAsk
    ) -> tuple[AdmitResult | None, Lease | None]:
        """Admit one request of ``ask.cost`` and reserve up to ``ask.want - ask.cost``
        more units (at most :data:`LEASE_FRACTION` of what is left) for the caller,
        atomically.

        Only for checks that are all quota windows (ConfigError otherwise). The lease is
        recorded under ``ask.lease_id`` so :meth:`return_lease` can give back its unused
        part exactly once. Returns the admit's result (None when the account's status is
        not normal: nothing was done, the caller must use :meth:`admit`, which applies
        statuses) and the lease (None: no spare unit reserved). A store without leases
        admits per call.
        """
        return self.admit(checks, cost=ask.cost, now=ask.now, account=ask.account), None

    async def get_status_async(
        self, account: str, *, now: float, deadline_s: float
    ) -> AccountStatus:
        """:meth:`get_status` awaited within ``deadline_s`` (UnavailableError past it)."""
        call = partial(self.get_status, account, now=now)
        return await self.call_soon_async(call, deadline_s=deadline_s)

    async def lease_async(
        self, checks: Sequence[Check], ask: LeaseAsk, *, deadline_s: float
    ) -> tuple[AdmitResult | None, Lease | None]:
        """:meth:`lease` awaited within ``deadline_s`` (UnavailableError past it)."""
        return await self.call_soon_async(partial(self.lease, checks, ask), deadline_s=deadline_s)

    def return_lease(self, lease_id: str, unused: int, *, now: float) -> None:  # noqa: B027
        """Give back ``unused`` units of the lease, atomically and at most once: the
        record is deleted in the same step, so a second return, or a return after the
        lease record was reset or expired, gives back nothing."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


HISTORY_LIMIT = 1000


def validate_cost(cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigError(f"cost must be a positive integer, got {cost!r}")


def resolve(checks: Sequence[Check], now: float) -> list[tuple[str, float]]:
    """For each check at ``now``: its storage key and its window's end (0 for buckets)."""
    bounds: dict[Period, tuple[float, float]] = {}
    out = []
    for c in checks:
        if c.period is None:
            out.append((c.prefix, 0.0))
            continue
        b = bounds.get(c.period)
        if b is None:
            b = bounds[c.period] = window_bounds(c.period, now)
        out.append((c.prefix + str(int(b[0])), b[1]))
    return out


def gate(
    status: AccountStatus | None, *, now: float, work: int
) -> tuple[AccountStatus | None, bool, float]:
    """Apply an account status: ``(active status or None, blocked, rate factor)``.

    The Redis Lua script mirrors this exactly."""
    if status is None or not status.active_at(now) or status.kind is Status.NORMAL:
        return None, False, 1.0
    if status.kind is Status.SUSPENDED:
        return status, True, 1.0
    if status.kind is Status.CHALLENGED:
        assert status.difficulty is not None
        return status, work < status.difficulty, 1.0
    assert status.factor is not None
    return status, False, status.factor


def blocked_result(status: AccountStatus, now: float) -> AdmitResult:
    wait = None
    if status.kind is Status.SUSPENDED and status.expires_at is not None:
        wait = status.expires_at - now
    return AdmitResult(False, (), status=status, retry_after=wait)


def bucket_level(
    tokens: float | None, ts: float | None, check: Check, rate: float, now: float
) -> float:
    """Tokens in the bucket at ``now`` (the Redis Lua script mirrors this exactly)."""
    if tokens is None or ts is None:
        return float(check.limit)
    return min(float(check.limit), tokens + max(0.0, now - ts) * rate)


def fits(check: Check, level: float, cost: int) -> bool:
    if check.period is None:
        return level + TOKEN_EPS >= cost
    return level + cost <= check.limit


def peek(
    checks: Sequence[Check],
    ends: Sequence[float],
    levels: Sequence[float],
    rates: Sequence[float],
    *,
    now: float,
    used: int = 0,
) -> tuple[Remaining, ...]:
    """What is left of each check given its level (bucket tokens or window count) after
    ``used`` more units were consumed."""
    out = []
    for check, end, level, rate in zip(checks, ends, levels, rates, strict=True):
        if check.period is None:
            after = level - used
            out.append(
                Remaining(
                    check.name, check.limit, max(0, math.floor(after)), (check.limit - after) / rate
                )
            )
        else:
            out.append(
                Remaining(
                    check.name, check.limit, max(0, check.limit - int(level) - used), end - now
                )
            )
    return tuple(out)


def finish(
    checks: Sequence[Check],
    ends: Sequence[float],
    levels: Sequence[float],
    rates: Sequence[float],
    *,
    cost: int,
    now: float,
    admitted: bool,
    status: AccountStatus | None,
) -> AdmitResult:
    """Turn per-check levels (before this request) into an AdmitResult. Shared by every
    backend so they answer identically."""
    if admitted:
        return AdmitResult(
            True, peek(checks, ends, levels, rates, now=now, used=cost), status=status
        )
    worst: tuple[Check, float | None] | None = None
    for check, end, level, rate in zip(checks, ends, levels, rates, strict=True):
        if fits(check, level, cost):
            continue
        wait: float | None
        if cost > check.limit:
            wait = None
        elif check.period is None:
            wait = (cost - level) / rate
        else:
            wait = end - now
        if worst is None or (worst[1] is not None and (wait is None or wait > worst[1])):
            worst = (check, wait)
    assert worst is not None, "refused without a failing check"
    return AdmitResult(
        False,
        peek(checks, ends, levels, rates, now=now),
        refused_by=worst[0],
        retry_after=worst[1],
        status=status,
    )


def lease_slots(checks: Sequence[Check], *, cost: int, now: float) -> list[tuple[str, float]]:
    """:func:`resolve` for a lease: raises ConfigError for a bad cost or a token bucket."""
    validate_cost(cost)
    if any(c.period is None for c in checks):
        raise ConfigError("only quota windows can be leased (token buckets are per call)")
    return resolve(checks, now)


def lease_take(checks: Sequence[Check], levels: Sequence[float], *, cost: int, want: int) -> int:
    """Units a lease takes from windows at ``levels`` (0: the request does not fit).
    The Redis lease script mirrors this exactly."""
    left = min(c.limit - int(lv) for c, lv in zip(checks, levels, strict=True))
    if left < cost:
        return 0
    return max(cost, min(want, math.floor(left * LEASE_FRACTION)))


def lease_answer(
    checks: Sequence[Check],
    ends: Sequence[float],
    levels: Sequence[float],
    ask: LeaseAsk,
    *,
    take: int,
    expires: float,
) -> tuple[AdmitResult, Lease | None]:
    """The result of a lease that took ``take`` units (0: refused) from ``levels``."""
    cost, now, lease_id = ask.cost, ask.now, ask.lease_id
    zeros = [0.0] * len(checks)
    result = finish(checks, ends, levels, zeros, cost=cost, now=now, admitted=take > 0,
                    status=None)  # fmt: skip
    if take <= cost:
        return result, None
    after = peek(checks, ends, levels, zeros, now=now, used=take)
    return result, Lease(lease_id, take - cost, expires, after)


class Txn(Protocol):
    """Primitive operations a transactional backend offers inside one transaction."""

    def read(
        self, bucket_keys: Sequence[str], window_keys: Sequence[str], account: str | None
    ) -> tuple[dict[str, tuple[float, float]], dict[str, int], AccountStatus | None]: ...

    def write(
        self,
        buckets: Sequence[tuple[str, float, float, float]],
        windows: Sequence[tuple[str, int, float]],
    ) -> None: ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete the state under ``keys`` and every lease recorded on them."""

    def put_lease(
        self, lease_id: str, windows: Sequence[tuple[str, float]], units: int, expires: float
    ) -> None:
        """Record a lease of ``units`` on ``windows`` (key, the window state's expiry);
        the record is purged after ``expires``."""

    def take_lease(self, lease_id: str) -> tuple[list[tuple[str, float]], int] | None:
        """Delete the lease's record and return its windows and units (None: none)."""


class TransactionalStore(StateStore):
    """Quota logic over a backend that offers serialisable transactions (memory, SQLite).

    Subclasses provide :meth:`transaction`; this class holds the arithmetic, so the two
    backends cannot drift apart.
    """

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Txn]:
        """An exclusive read-write transaction, committed when the block exits cleanly."""

    @staticmethod
    def _split(
        checks: Sequence[Check], slots: list[tuple[str, float]]
    ) -> tuple[list[str], list[str]]:
        bkeys: list[str] = []
        wkeys: list[str] = []
        for c, (key, _) in zip(checks, slots, strict=True):
            (bkeys if c.period is None else wkeys).append(key)
        return bkeys, wkeys

    @staticmethod
    def _levels(
        checks: Sequence[Check],
        slots: list[tuple[str, float]],
        buckets: dict[str, tuple[float, float]],
        windows: dict[str, int],
        factor: float,
        now: float,
    ) -> tuple[list[float], list[float]]:
        levels: list[float] = []
        rates: list[float] = []
        for check, (key, _) in zip(checks, slots, strict=True):
            if check.period is None:
                rate = check.rate * factor if check.throttle else check.rate
                state = buckets.get(key)
                levels.append(
                    float(check.limit)
                    if state is None
                    else bucket_level(state[0], state[1], check, rate, now)
                )
                rates.append(rate)
            else:
                levels.append(float(windows.get(key, 0)))
                rates.append(0.0)
        return levels, rates

    def admit(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
    ) -> AdmitResult:
        validate_cost(cost)
        # Everything that needs no stored state is computed before taking the lock.
        slots = resolve(checks, now)
        bkeys, wkeys = self._split(checks, slots)
        with self.transaction() as tx:
            buckets, windows, raw_status = tx.read(bkeys, wkeys, account)
            status, blocked, factor = gate(raw_status, now=now, work=work)
            if blocked:
                assert status is not None
                return blocked_result(status, now)
            levels, rates = self._levels(checks, slots, buckets, windows, factor, now)
            ok = all(fits(c, lv, cost) for c, lv in zip(checks, levels, strict=True))
            if ok:
                bw: list[tuple[str, float, float, float]] = []
                ww: list[tuple[str, int, float]] = []
                for check, (key, end), level, rate in zip(
                    checks, slots, levels, rates, strict=True
                ):
                    if check.period is None:
                        tokens = level - cost
                        old = buckets.get(key)
                        ts = now if old is None else max(old[1], now)
                        full_at = now + (check.limit - tokens) / rate
                        bw.append((key, tokens, ts, full_at + STATE_SLACK_S))
                    else:
                        ww.append((key, int(level) + cost, end + STATE_SLACK_S))
                tx.write(bw, ww)
        ends = [end for _, end in slots]
        return finish(checks, ends, levels, rates, cost=cost, now=now, admitted=ok, status=status)

    def usage(
        self, checks: Sequence[Check], *, now: float, account: str | None = None
    ) -> tuple[Remaining, ...]:
        slots = resolve(checks, now)
        bkeys, wkeys = self._split(checks, slots)
        with self.transaction() as tx:
            buckets, windows, raw_status = tx.read(bkeys, wkeys, account)
        _, _, factor = gate(raw_status, now=now, work=0)
        levels, rates = self._levels(checks, slots, buckets, windows, factor, now)
        return peek(checks, [e for _, e in slots], levels, rates, now=now)

    def reset(self, checks: Sequence[Check], *, now: float) -> None:
        with self.transaction() as tx:
            tx.delete([k for k, _ in resolve(checks, now)])

    leases = True

    def lease(
        self, checks: Sequence[Check], ask: LeaseAsk
    ) -> tuple[AdmitResult | None, Lease | None]:
        cost, now = ask.cost, ask.now
        slots = lease_slots(checks, cost=cost, now=now)
        keys = [k for k, _ in slots]
        ends = [end for _, end in slots]
        with self.transaction() as tx:
            _, windows, raw_status = tx.read([], keys, ask.account)
            if gate(raw_status, now=now, work=0)[0] is not None:
                return None, None  # any status but normal: admit per call
            levels = [float(windows.get(k, 0)) for k in keys]
            take = lease_take(checks, levels, cost=cost, want=ask.want)
            expires = min(now + ask.lease_s, *ends)
            if take:
                states = [(k, end + STATE_SLACK_S) for k, end in slots]
                tx.write([], [(k, int(lv) + take, exp)
                              for (k, exp), lv in zip(states, levels, strict=True)])  # fmt: skip
                if take > cost:
                    tx.put_lease(ask.lease_id, states, take - cost, expires + STATE_SLACK_S)
        return lease_answer(checks, ends, levels, ask, take=take, expires=expires)

    def return_lease(self, lease_id: str, unused: int, *, now: float) -> None:
        with self.transaction() as tx:
            record = tx.take_lease(lease_id)
            if record is None or unused <= 0:
                return
            states, units = record
            give = min(unused, units)
            _, windows, _ = tx.read([], [k for k, _ in states], None)
            # Never below zero (a reset in between deleted the record too, so this is
            # only a guard); each window keeps its own expiry.
            tx.write([], [(k, max(0, windows[k] - give), exp)
                          for k, exp in states if k in windows])  # fmt: skip


class UnsafeFailOpen(StateStore):
    """UNSAFE: wraps a store so that quota admits and status reads succeed when the store
    is unreachable. Every such use logs a warning. Blobs, nonces, status writes and resets
    still raise. Use only when availability matters more than the limits."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        log.warning("UnsafeFailOpen enabled: quotas are NOT enforced while the store is down")

    def admit(
        self,
        checks: Sequence[Check],
        *,
        cost: int,
        now: float,
        account: str | None = None,
        work: int = 0,
    ) -> AdmitResult:
        try:
            return self.inner.admit(checks, cost=cost, now=now, account=account, work=work)
        except UnavailableError as exc:
            return self._fail_open(exc)

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
        try:
            return await self.inner.admit_async(
                checks, cost=cost, now=now, account=account, work=work, deadline_s=deadline_s
            )
        except UnavailableError as exc:
            return self._fail_open(exc)

    async def call_async(self, fn: Callable[[], T], *, deadline_s: float) -> T:
        return await self.inner.call_async(fn, deadline_s=deadline_s)

    @staticmethod
    def _fail_open(exc: UnavailableError) -> AdmitResult:
        log.warning("UNSAFE FAIL-OPEN: admitting a request unchecked: %s", exc)
        return AdmitResult(True, ())

    def usage(
        self, checks: Sequence[Check], *, now: float, account: str | None = None
    ) -> tuple[Remaining, ...]:
        return self.inner.usage(checks, now=now, account=account)

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
