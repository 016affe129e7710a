"""The defense pipeline the server calls twice per request (DESIGN.md):

- ``admit`` before inference: account status, proof of work, rate limits and quotas;
- ``release`` after inference: later layers (detection, perturbation, watermark,
  audit) observe the query and may change the answer before it is encoded.

Transport-free: the server hands in who is calling (:class:`Caller`) and numpy arrays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from sealserve.defense.audit.refusals import refusal_reason
from sealserve.defense.peer import peer_address
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.release.pipeline import OutputDefenses
from sealserve.defense.store.base import Remaining
from sealserve.errors import PermissionDeniedError, RefusedError, UnavailableError

ANONYMOUS = "anonymous"
RESERVED = "\x00"
log = logging.getLogger("sealserve.defense")


class Caller(NamedTuple):
    """Who is asking: the authenticated account and tier, and the peer address that
    per-peer limits count (already resolved through trusted proxies). Immutable; a
    tuple, built on every request at a fraction of a frozen dataclass's cost."""

    account: str
    tier: str | None
    peer: str
    protocol: str = "grpc"  # which front door: "grpc" or "rest" (metrics, audit)


@dataclass(frozen=True)
class ProofOfWork:
    challenge: str
    solution: str


class Guard:
    """Admission and release for every inference request. ``quota`` None: no limits."""

    def __init__(
        self,
        *,
        quota: QuotaGuard | None = None,
        output: OutputDefenses | None = None,
        store_deadline_s: float = 0.5,
        store_io: bool | None = None,
    ) -> None:
        self.quota = quota
        # Output defenses are built from the loaded models (their outputs, a reference
        # run): given here, or once by ``arm`` when the models have loaded.
        self.output = output
        #: How long the serving path waits for the state store before refusing.
        self.store_deadline_s = store_deadline_s
        #: Whether the state store waits on I/O: release (detector state, statuses) then
        #: runs off the event loop, so a hung store cannot stall other RPCs.
        #: (None: the quota's store decides; the server passes the one store it opened.)
        self.store_io = quota is not None and quota.store.blocking if store_io is None else store_io
        # Resolved peer addresses by (transport peer, forwarded-for): parsing them
        # with ipaddress on every request costs more than the rest of the admission.
        self._peers: dict[tuple[str, str | None], str] = {}

    @property
    def idle(self) -> bool:
        """Nothing to admit or release: no limits and no output defenses."""
        return self.quota is None and self.output is None

    def arm(self, output: OutputDefenses) -> None:
        """Install the output defenses built for the loaded models; once only.

        Raises RuntimeError when the guard already has them."""
        if self.output is not None:
            raise RuntimeError("the guard's output defenses are already in place")
        self.output = output

    def caller(
        self,
        *,
        account: str | None,
        tier: str | None,
        transport_peer: str,
        forwarded_for: str | None,
        protocol: str = "grpc",
    ) -> Caller:
        if account is not None and account.startswith(RESERVED):
            # Pooled detection streams live under such names (release/cohort.py).
            raise PermissionDeniedError("account names may not start with a NUL character")
        key = (transport_peer, forwarded_for)
        peer = self._peers.get(key)
        if peer is None:
            proxies = self.quota.config.trusted_proxies if self.quota is not None else ()
            peer = peer_address(transport_peer, forwarded_for, trusted_proxies=proxies)
            if len(self._peers) > 10_000:
                self._peers.clear()
            self._peers[key] = peer
        return Caller(account or ANONYMOUS, tier, peer, protocol)

    async def admit_async(
        self,
        caller: Caller,
        model: str,
        *,
        batch_size: int = 1,
        pow_: ProofOfWork | None = None,
        now: float | None = None,
    ) -> tuple[Remaining, ...]:
        """Admit one request or raise (SuspendedError, ChallengeRequiredError,
        RateLimitedError, PermissionDeniedError, UnavailableError: also when the store
        does not answer within ``store_deadline_s``). Returns what is left of every
        limit. Awaited on the event loop; no store call blocks it."""
        if self.quota is None:
            return ()
        worker = self.output.worker if self.output is not None else None
        # The verdict the account's last rows earn first (detection beside the request
        # path, release/beside.py); a worker stuck on the store fails closed.
        if (
            worker is not None
            and worker.pending(caller.account)
            and not await worker.settled(caller.account, self.store_deadline_s)
        ):
            raise UnavailableError(
                "detection of this account's earlier requests has not finished; retry shortly",
                retry_after=1.0,
            )
        try:
            result = await self.quota.admit_async(
                caller.account,
                caller.tier,
                caller.peer,
                model,
                deadline_s=self.store_deadline_s,
                batch_size=batch_size,
                challenge=pow_.challenge if pow_ else None,
                solution=pow_.solution if pow_ else None,
                now=now,
            )
        except RefusedError as exc:
            self.audit_refusal(caller, model, exc, batch_size, now)
            raise
        return result.remaining

    def audit_refusal(
        self, caller: Caller, model: str, exc: RefusedError, rows: int, now: float | None
    ) -> None:
        """Refusals go to the audit log too (added up beyond a threshold per account)."""
        audit = self.output.audit if self.output is not None else None
        if audit is None:
            return
        try:
            audit.append_refusal_at_time(
                time.time() if now is None else now, account=caller.account, model=model,
                reason=refusal_reason(exc), detail=exc.message, rows=rows,
            )  # fmt: skip
        except Exception:  # a full disk must not turn a refusal into an internal error
            log.exception("could not record a refusal in the audit log")

    def to_compute(self, model: str, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The outputs inference must produce for a request naming ``requested``: a
        defended model always computes its defended output, whatever was asked for.
        Raises InputError for an output the defenses do not cover."""
        if self.output is None:
            return requested
        return self.output.to_compute(model, requested)

    def large_batch(self, rows: int) -> bool:
        """Whether a request of ``rows`` rows is judged before it is answered."""
        return self.output is not None and self.output.large_batch(rows)

    def release(
        self, caller: Caller, model: str, inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray], *, requested: tuple[str, ...] = (),
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """The outputs to send back (those in ``requested``; all when empty):
        detection, perturbation, watermark and audit run here when configured, on every
        row, whichever outputs were asked for. Raises UnavailableError (state store
        down)."""
        if self.output is None:
            return outputs
        released = self.output.release(
            caller.account, caller.tier, model, inputs, outputs, protocol=caller.protocol
        )
        return self.output.served(model, requested, released)

    async def release_async(
        self, caller: Caller, model: str, inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray], *, requested: tuple[str, ...] = (), rows: int = 1,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """:meth:`release` for the event loop: off it (in a worker thread) when it waits
        on a store that does I/O, or when a large batch is scored before its answer;
        inline otherwise."""
        if self.output is None:
            return outputs
        release = partial(self.release, caller, model, inputs, outputs, requested=requested)
        if self.store_io or self.large_batch(rows):
            return await asyncio.to_thread(release)
        return release()
