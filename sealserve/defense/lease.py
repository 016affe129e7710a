"""Quota leases: a replica admits most requests from a slice of the account's quota
windows reserved for it in the store, so most admissions write nothing there.

A lease is taken by :meth:`StateStore.lease` in one atomic step that admits the request
and counts ``slice`` units in every window of the request, recording the spare part
under a lease id. This replica then admits requests of the same checks from the spare
units until they are used up, the lease expires (``lease_s``) or the first window ends;
the unused part is given back by :meth:`StateStore.return_lease`, which deletes the
record in the same step, so it is returned at most once. A replica that dies (kill -9)
never returns its lease: those units stay counted in their window, lost for it, never
extra allowance (docs/quotas.md, "Leases").

What is leased, and what stays per call:

- Only quota windows. A token bucket is never leased: tokens taken early let the
  bucket refill meanwhile, so one replica's lease plus the refill others admit could
  exceed ``burst`` in a short interval. A request whose limits include a bucket is
  admitted per call, as without leases.
- The account's status is read per call (one read, no write): a suspension, challenge
  or throttle takes effect on the very next call on every replica; an account whose
  status is not normal is admitted per call, and its lease here is given back.
- Proof-of-work calls are admitted per call.

Slice: the account's recent admitted rate on this replica times ``lease_s`` (at least the
request's cost), capped in the store at :data:`~sealserve.defense.store.base.
LEASE_FRACTION` of what is left of the tightest window, so an account near its limit
gets slices of one request: per-call exactness where it matters.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from sealserve.defense.status import Status
from sealserve.defense.store.base import (
    AdmitResult,
    Check,
    Lease,
    LeaseAsk,
    Remaining,
    StateStore,
    StoreBusy,
)
from sealserve.errors import UnavailableError

#: Most units one lease may ask for (a bound on what a killed replica can strand).
MAX_SLICE = 10_000
#: Most expired leases given back per new lease taken.
SWEEP = 8
#: Weight of the newest interval in the admitted-rate estimate.
RATE_WEIGHT = 0.5


@dataclass
class _Held:
    key: tuple[Check, ...]
    lease: Lease
    left: int
    taken_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Rate:
    since: float
    units: int = 0
    per_s: float = 0.0


class LeaseTable:
    """This replica's leases, one per request shape (account, tier, peer, model: the
    checks tuple). Thread-safe. ``holder`` names the replica in lease ids (default:
    host-process id and a random part)."""

    def __init__(self, store: StateStore, *, lease_s: float, holder: str | None = None) -> None:
        self.store = store
        self.lease_s = lease_s
        self.holder = holder or f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._held: dict[tuple[Check, ...], _Held] = {}
        self._rates: dict[tuple[Check, ...], _Rate] = {}
        self._displaced: list[_Held] = []
        #: Store calls made by admissions (status reads, leases, returns), and of those
        #: the ones that write (leases, returns): benchmark and test figures.
        self.store_calls = 0
        self.store_writes = 0

    @staticmethod
    def leasable(checks: Sequence[Check]) -> bool:
        return bool(checks) and all(c.period is not None for c in checks)

    def admit(
        self, checks: tuple[Check, ...], *, cost: int, now: float, account: str
    ) -> AdmitResult | None:
        """Admit from this replica's lease, taking a new one when it is used up.

        Returns None when the request must be admitted per call (its limits include a
        token bucket, or the account's status is not normal); otherwise the admit's
        result (refused: by a limit, with nothing consumed). Raises UnavailableError."""
        if not self.leasable(checks):
            return None
        self.store_calls += 1
        normal = self.store.get_status(account, now=now).kind is Status.NORMAL
        local = self._local(checks, cost, now) if normal else None
        if local is not None:
            return local
        self._return_all(self._stale(checks, now), now)
        if not normal:
            return None
        result, lease = self.store.lease(checks, self._ask(checks, cost, now, account))
        return self._install(checks, cost, now, result, lease)

    async def admit_async(
        self, checks: tuple[Check, ...], *, cost: int, now: float, account: str,
        deadline_s: float,
    ) -> AdmitResult | None:  # fmt: skip
        """:meth:`admit` for the event loop: its store calls are awaited, all of them
        within ``deadline_s`` (UnavailableError past it)."""
        if not self.leasable(checks):
            return None
        try:
            # One deadline for every store call of the admission (asyncio.timeout, not
            # wait_for: no task per admission).
            async with asyncio.timeout(deadline_s):
                return await self._admit_async(checks, cost, now, account, deadline_s)
        except TimeoutError as exc:
            raise UnavailableError(
                f"state store did not answer within {deadline_s:g} s", retry_after=1.0
            ) from exc

    async def _admit_async(
        self, checks: tuple[Check, ...], cost: int, now: float, account: str, deadline_s: float
    ) -> AdmitResult | None:
        self.store_calls += 1
        status = await self.store.get_status_async(account, now=now, deadline_s=deadline_s)
        normal = status.kind is Status.NORMAL
        local = self._local(checks, cost, now) if normal else None
        if local is not None:
            return local
        stale = self._stale(checks, now)
        if stale:  # returns: once per slice, so a worker thread is cheap enough here
            back = partial(self._return_all, stale, now)
            await self.store.call_soon_async(back, deadline_s=deadline_s)
        if not normal:
            return None
        ask = self._ask(checks, cost, now, account)
        result, lease = await self.store.lease_async(checks, ask, deadline_s=deadline_s)
        return self._install(checks, cost, now, result, lease)

    def _local(self, checks: tuple[Check, ...], cost: int, now: float) -> AdmitResult | None:
        """The admit from the lease held for ``checks`` (None: none, or too little left)."""
        held = self._held.get(checks)
        if held is None:
            return None
        with held.lock:
            if now < held.lease.expires_at and held.left >= cost:
                held.left -= cost
                self._count(checks, cost)
                return AdmitResult(True, _remaining(held, now))
        return None

    def _ask(self, checks: tuple[Check, ...], cost: int, now: float, account: str) -> LeaseAsk:
        self.store_calls += 1
        self.store_writes += 1
        lease_id = f"{self.holder}-{secrets.token_hex(6)}"
        return LeaseAsk(cost, self._slice(checks, cost), now, account, lease_id, self.lease_s)

    def _install(
        self, checks: tuple[Check, ...], cost: int, now: float, result: AdmitResult | None,
        lease: Lease | None,
    ) -> AdmitResult | None:  # fmt: skip
        if result is None:  # the status changed since it was read
            return None
        if result.admitted:
            self._count(checks, cost)
        if lease is not None:
            with self._lock:
                old = self._held.get(checks)
                self._held[checks] = _Held(checks, lease, lease.units, now)
                if old is not None:  # a concurrent taker installed one first
                    self._displaced.append(old)  # given back with the next stale ones
        return result

    # The rate is measured on this process's monotonic clock, not the ``now`` the
    # caller passes for the quota arithmetic (tests and replays hold that still).
    def _slice(self, checks: tuple[Check, ...], cost: int) -> int:
        rate = self._rates.get(checks)
        if rate is None:
            return cost
        now = time.monotonic()
        elapsed = now - rate.since
        if elapsed > 0:
            rate.per_s = RATE_WEIGHT * rate.units / elapsed + (1 - RATE_WEIGHT) * rate.per_s
            rate.units, rate.since = 0, now
        return max(cost, min(MAX_SLICE, math.ceil(rate.per_s * self.lease_s) + cost))

    def _count(self, checks: tuple[Check, ...], cost: int) -> None:
        rate = self._rates.get(checks)
        if rate is None:
            if len(self._rates) > 8192:
                self._rates.clear()
            rate = self._rates[checks] = _Rate(time.monotonic())
        rate.units += cost

    def _stale(self, checks: tuple[Check, ...], now: float) -> list[_Held]:
        """Take out of the table the lease held for ``checks`` and a few that expired
        unused (their accounts went quiet): they are to be given back."""
        with self._lock:
            gone = [k for k, h in self._held.items() if h.lease.expires_at <= now][:SWEEP]
            if checks in self._held and checks not in gone:
                gone.append(checks)
            out, self._displaced = self._displaced, []
            return out + [self._held.pop(k) for k in gone]

    def _return_all(self, held: list[_Held], now: float) -> None:
        for i, h in enumerate(held):
            try:
                self._return(h, now)
            except StoreBusy:
                with self._lock:  # not tried yet: kept, given back later
                    self._displaced.extend(held[i + 1 :])
                raise

    def _return(self, held: _Held, now: float) -> None:
        with held.lock:
            unused, held.left = held.left, 0
        self.store_calls += 1
        self.store_writes += 1
        try:
            self.store.return_lease(held.lease.lease_id, unused, now=now)
        except StoreBusy:
            # Nothing was done (an inline call would have waited): keep the lease for
            # later. Any other failure may have returned it already (a timeout after
            # the store acted), so its units are never used again: lost, not granted.
            with held.lock:
                held.left = unused
            with self._lock:
                if held.key in self._held:
                    self._displaced.append(held)
                else:
                    self._held[held.key] = held
            raise

    def close(self, *, now: float) -> None:
        """Give back every lease (shutdown). Raises UnavailableError (the leases then
        stay counted: capacity lost, never granted)."""
        with self._lock:
            held, self._held = [*self._held.values(), *self._displaced], {}
            self._displaced = []
        self._return_all(held, now)


def _remaining(held: _Held, now: float) -> tuple[Remaining, ...]:
    # What the store had left after the lease, plus what this replica still holds.
    age = now - held.taken_at
    return tuple(
        Remaining(r.name, r.limit, r.remaining + held.left, r.reset_after - age)
        for r in held.lease.remaining
    )
