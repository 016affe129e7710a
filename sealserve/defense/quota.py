"""The quota guard: status, proof of work and limits for one request, transport-free.

The server's guard calls :meth:`QuotaGuard.admit` once per request; the admin service
calls the other methods. Everything raises; nothing returns a bool to forget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from urllib.parse import quote

from sealserve.defense.challenge import Challenges
from sealserve.defense.lease import LeaseTable
from sealserve.defense.limits import LimitsConfig, LimitSet, Period, Tier
from sealserve.defense.status import AccountStatus, Status
from sealserve.defense.store.base import (
    AdmitResult,
    Check,
    Remaining,
    StateStore,
    account_group,
)
from sealserve.errors import (
    ChallengeRequiredError,
    ConfigError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)

MEMO_SIZE = 8192
_ADJ = {Period.MINUTE: "per-minute", Period.DAY: "daily", Period.MONTH: "monthly"}


def _q(part: str) -> str:
    # Percent-encode so that an account or model name cannot forge another's key.
    return quote(part, safe="")


def limit_checks(
    limits: LimitSet,
    *,
    scope: str,
    subject: str,
    key: str,
    unit: str,
    throttle: bool = False,
    group: str = "",
) -> list[Check]:
    """The checks of one limit set for one subject (``scope`` names them: account,
    peer, model)."""
    out: list[Check] = []
    if limits.bucket is not None:
        out.append(
            Check(
                f"{scope}.rate",
                f"{subject} rate limit",
                key,
                limits.bucket.burst,
                rate=float(limits.bucket.rate),
                throttle=throttle,
                unit=unit,
                group=group,
            )
        )
    for period in Period:
        if period in limits.quotas:
            out.append(
                Check(
                    f"{scope}.{period.value}",
                    f"{subject} {_ADJ[period]} quota",
                    key,
                    limits.quotas[period],
                    period=period,
                    unit=unit,
                    group=group,
                )
            )
    return out


class QuotaGuard:
    """Applies account status, proof of work and every configured limit to a request.

    ``challenges`` may be None only if no account is ever put in the challenged status
    (a challenged account is then refused with a clear message).
    """

    def __init__(
        self, config: LimitsConfig, store: StateStore, challenges: Challenges | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.challenges = challenges
        #: This replica's quota leases ([limits] lease = true, on a store that has them).
        self.leases = (
            LeaseTable(store, lease_s=config.lease_s) if config.lease and store.leases else None
        )
        # Checks depend only on the config and the request's names: build them once.
        self._memo: dict[tuple[str, str | None, str | None, str | None], tuple[Check, ...]] = {}

    def _tier(self, tier: str | None) -> Tier:
        try:
            return self.config.tier(tier)
        except ConfigError as exc:
            raise PermissionDeniedError(f"account tier is not configured: {exc}") from exc

    def checks(
        self, account: str, tier: str | None, peer: str | None, model: str | None
    ) -> tuple[Check, ...]:
        """Every check for a request (``peer``/``model`` None: leave those scopes out).

        Raises PermissionDeniedError for an unknown tier."""
        memo_key = (account, tier, peer, model)
        cached = self._memo.get(memo_key)
        if cached is None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            cached = tuple(self._build_checks(account, tier, peer, model))
            self._memo[memo_key] = cached
        return cached

    def _build_checks(
        self, account: str, tier: str | None, peer: str | None, model: str | None
    ) -> list[Check]:
        t = self._tier(tier)
        unit = "items" if t.cost.value == "batch" else "requests"
        group = account_group(account)
        if t.per_model and model is not None:
            akey, subject = f"am/{_q(account)}/{_q(model)}", f"account model {model!r}"
        else:
            akey, subject = group, "account"
        out = limit_checks(
            t.limits,
            scope="account",
            subject=subject,
            key=akey,
            unit=unit,
            throttle=True,
            group=group,
        )
        if peer is not None:
            out += limit_checks(
                self.config.peer,
                scope="peer",
                subject=f"peer {peer}",
                key=f"p/{_q(peer)}",
                unit=unit,
            )
        if model is not None:
            out += limit_checks(
                self.config.model_limits(model),
                scope="model",
                subject=f"model {model!r}",
                key=f"m/{_q(model)}",
                unit=unit,
            )
        return out

    def admit(
        self,
        account: str,
        tier: str | None,
        peer: str,
        model: str,
        *,
        batch_size: int = 1,
        challenge: str | None = None,
        solution: str | None = None,
        now: float | None = None,
    ) -> AdmitResult:
        """Admit one request or raise. One store round trip when no challenge is sent.

        ``challenge``/``solution``: the proof of work a challenged account sends with its
        call (ignored for other accounts). Raises SuspendedError (account suspended),
        InputError (more rows than the tier allows per request),
        ChallengeRequiredError (challenged account without a valid answer;
        ``.challenge`` holds a fresh one), RateLimitedError (a limit is hit;
        ``retry_after`` and the limit in the message), PermissionDeniedError (unknown
        tier), UnavailableError (store unreachable). Returns the admitted result with
        what is left of every limit.
        """
        now = time.time() if now is None else now
        checks, cost = self._prepare(account, tier, peer, model, batch_size)
        work, work_error = 0, None
        if challenge and solution is not None and self.challenges is not None:
            work, work_error = self._verify_work(account, challenge, solution, now, batch_size)
        result = self._leased(checks, cost, now, account, work)
        if result is None:
            result = self.store.admit(checks, cost=cost, now=now, account=account, work=work)
        return self._conclude(result, account, work, work_error, now, batch_size)

    def _leased(
        self, checks: tuple[Check, ...], cost: int, now: float, account: str, work: int
    ) -> AdmitResult | None:
        """The admit from this replica's lease (None: admit per call)."""
        if self.leases is None or work:
            return None
        return self.leases.admit(checks, cost=cost, now=now, account=account)

    async def admit_async(
        self,
        account: str,
        tier: str | None,
        peer: str,
        model: str,
        *,
        deadline_s: float,
        batch_size: int = 1,
        challenge: str | None = None,
        solution: str | None = None,
        now: float | None = None,
    ) -> AdmitResult:
        """:meth:`admit` for the event loop: every store call is awaited and answers
        within ``deadline_s`` seconds, or the request is refused with UnavailableError."""
        now = time.time() if now is None else now
        checks, cost = self._prepare(account, tier, peer, model, batch_size)
        work, work_error = 0, None
        if challenge and solution is not None and self.challenges is not None:
            # Consuming the challenge is a store call too (a challenged account only).
            verify = partial(self._verify_work, account, challenge, solution, now, batch_size)
            work, work_error = await self.store.call_async(verify, deadline_s=deadline_s)
        result = None
        if self.leases is not None and not work:
            result = await self.leases.admit_async(
                checks, cost=cost, now=now, account=account, deadline_s=deadline_s
            )
        if result is None:
            result = await self.store.admit_async(
                checks, cost=cost, now=now, account=account, work=work, deadline_s=deadline_s
            )
        return self._conclude(result, account, work, work_error, now, batch_size)

    def _prepare(
        self, account: str, tier: str | None, peer: str, model: str, batch_size: int
    ) -> tuple[tuple[Check, ...], int]:
        t = self._tier(tier)
        t.check_rows(batch_size)
        return self.checks(account, t.name, peer, model), t.cost_of(batch_size)

    def _verify_work(
        self, account: str, challenge: str, solution: str, now: float, rows: int
    ) -> tuple[int, str | None]:
        assert self.challenges is not None
        try:
            return self.challenges.verify(account, challenge, solution, now=now, rows=rows), None
        except ChallengeRequiredError as exc:
            return 0, exc.message

    def _conclude(
        self, result: AdmitResult, account: str, work: int, work_error: str | None, now: float,
        rows: int,
    ) -> AdmitResult:  # fmt: skip
        if result.admitted:
            return result
        status = result.status
        if result.refused_by is None and status is not None:
            if status.kind is Status.SUSPENDED:
                # The reason stays with the operator: it may describe how we detect abuse.
                raise SuspendedError("account is suspended", retry_after=result.retry_after)
            self._require_work(account, status, work, work_error, now, rows)
        assert result.refused_by is not None
        raise RateLimitedError(result.refused_by.describe(), retry_after=result.retry_after)

    def _require_work(
        self, account: str, status: AccountStatus, work: int, work_error: str | None, now: float,
        rows: int,
    ) -> None:  # fmt: skip
        assert status.difficulty is not None
        if self.challenges is None:
            raise ChallengeRequiredError(
                "account must solve a proof-of-work challenge, but this server issues none",
                remedy="The operator must configure a proof-of-work key.",
            )
        if work_error is not None:
            message = work_error
        elif work:
            message = "proof-of-work challenge is easier than now required"
        else:
            message = "proof-of-work answer required: solve the challenge and send it with the call"
        raise ChallengeRequiredError(
            message,
            challenge=self.challenges.issue(account, status.difficulty, now=now, rows=rows),
        )

    def close(self, *, now: float | None = None) -> None:
        """Give back this replica's unused leases (at shutdown). Raises
        UnavailableError (the leases then stay counted: capacity lost, never granted)."""
        if self.leases is not None:
            self.leases.close(now=time.time() if now is None else now)

    def issue_challenge(self, account: str, *, rows: int, now: float | None = None) -> str:
        """A fresh challenge for the account's current difficulty and ``rows`` rows
        ("" when this server issues none or the account is not challenged)."""
        now = time.time() if now is None else now
        status = self.status(account, now=now)
        if self.challenges is None or status.difficulty is None:
            return ""
        return self.challenges.issue(account, status.difficulty, now=now, rows=rows)

    # Admin operations -----------------------------------------------------------

    def usage(
        self, account: str, tier: str | None, *, model: str | None = None, now: float | None = None
    ) -> tuple[Remaining, ...]:
        """What is left of the account's own limits (for ``model`` when the tier counts
        per model)."""
        now = time.time() if now is None else now
        return self.store.usage(self.checks(account, tier, None, model), now=now, account=account)

    def reset(
        self, account: str, tier: str | None, *, model: str | None = None, now: float | None = None
    ) -> None:
        """Forget the account's current usage (its current windows and its bucket)."""
        now = time.time() if now is None else now
        self.store.reset(self.checks(account, tier, None, model), now=now)

    def status(self, account: str, *, now: float | None = None) -> AccountStatus:
        return self.store.get_status(account, now=time.time() if now is None else now)

    def history(self, account: str) -> list[AccountStatus]:
        return self.store.status_history(account)

    def set_status(self, account: str, status: AccountStatus) -> None:
        self.store.set_status(account, status)

    def apply_status(
        self,
        account: str,
        status: Status,
        *,
        reason: str,
        set_by: str,
        factor: float | None = None,
        difficulty: int | None = None,
        ttl_s: float | None = None,
        now: float | None = None,
    ) -> AccountStatus:
        """Set ``account``'s status: the one dispatch used by detection and the Admin
        service. A throttle without ``factor`` and a challenge without ``difficulty``
        get the defaults of :meth:`AccountStatus.make`; a normal status never expires.

        Raises:
            ConfigError: a factor outside (0, 1] or a difficulty outside 1..32.
            UnavailableError: the store cannot be reached.
        """
        now = time.time() if now is None else now
        expires = None if ttl_s is None else now + ttl_s
        st = AccountStatus.make(status, factor=factor, difficulty=difficulty, reason=reason,
                                set_by=set_by, set_at=now, expires_at=expires)  # fmt: skip
        self.store.set_status(account, st)
        return st

    def throttle(
        self, account: str, factor: float, *, reason: str, set_by: str,
        ttl_s: float | None = None, now: float | None = None,
    ) -> AccountStatus:  # fmt: skip
        return self._set(
            account, partial(AccountStatus.throttled, factor), reason, set_by, ttl_s, now
        )

    def challenge(
        self, account: str, difficulty: int, *, reason: str, set_by: str,
        ttl_s: float | None = None, now: float | None = None,
    ) -> AccountStatus:  # fmt: skip
        make = partial(AccountStatus.challenged, difficulty)
        return self._set(account, make, reason, set_by, ttl_s, now)

    def suspend(
        self, account: str, *, reason: str, set_by: str, ttl_s: float | None = None,
        now: float | None = None,
    ) -> AccountStatus:  # fmt: skip
        return self._set(account, AccountStatus.suspended, reason, set_by, ttl_s, now)

    def _set(
        self,
        account: str,
        make: Callable[..., AccountStatus],
        reason: str,
        set_by: str,
        ttl_s: float | None,
        now: float | None,
    ) -> AccountStatus:
        now = time.time() if now is None else now
        expires = None if ttl_s is None else now + ttl_s
        status = make(reason=reason, set_by=set_by, set_at=now, expires_at=expires)
        self.store.set_status(account, status)
        return status

    def lift(
        self, account: str, *, reason: str, set_by: str, now: float | None = None
    ) -> AccountStatus:
        now = time.time() if now is None else now
        status = AccountStatus.normal(reason=reason, set_by=set_by, set_at=now)
        self.store.set_status(account, status)
        return status
