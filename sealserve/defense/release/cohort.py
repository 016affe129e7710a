"""The aggregate view: young accounts of a tier judged together.

Per-account detectors need ``min_queries`` rows before they judge, so fifty accounts
of 19 uniform-noise rows each are never looked at one by one. Every row of a *young*
account (one whose distribution detector is not yet ready) is therefore also observed
in a pooled stream, one per tier and model, kept under a name no token can hold
(:data:`COHORT_PREFIX`).

An *episode*: when the pooled stream reaches the response policy's ``challenge`` level
the cohort is flagged (a status on the pooled name, recorded in the audit log). While
it is flagged, each young account that is seen is judged on its own few rows (the
distribution detector's outlier count, which it keeps before it is ready):

* rows like noise (binomial p <= 10^:data:`SUSPECT_LOG10_P` against the honest outlier
  rate): challenged at the full detection difficulty (the sybils' own escalation);
* at least ``graduate_rows`` rows, natural (p > 10^:data:`NATURAL_LOG10_P`): the account
  graduates, its cohort challenge is lifted and the cohort does not hold it again
  while its rows stay natural;
* otherwise (a newcomer's first rows): challenged at ``newcomer_difficulty``, a proof
  of work calibrated to cost an honest account <= 2x (docs/defenses.md).

The cohort is decided like an account, hysteresis included, on every young row: the
graduating newcomers' rows keep flowing into the pooled stream, so once its window
looks natural again the cohort steps down (throttle, then normal) without waiting out
the challenge level's hold, and the accounts it still challenges are released at their
next request. A sybil stream that continues keeps the window flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from sealserve.defense.audit.log import AuditLog
from sealserve.defense.detect import DetectorSuite
from sealserve.defense.detect.base import DetectorScore, SuiteResult
from sealserve.defense.escalation import DEFAULT_COHORT_DIFFICULTY, ResponsePolicy
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import AccountStatus, Status

log = logging.getLogger("sealserve.defense")

COHORT_PREFIX = "\x00cohort/"
"""Pooled streams are kept under names starting with this (no account may)."""
COHORT_SETTER = "detector"
"""``set_by`` of the statuses the cohort view writes: detection's own (so they expire
and step down like any detector status; the reason names the cohort)."""
YOUNG_DETECTOR = "distribution"
COHORT_REASON = "young account in a flagged cohort"
"""Start of the reason of every status the cohort view sets on an account."""
DEFAULT_GRADUATE_ROWS = 5
"""Natural rows after which a young account is no longer held by its cohort."""
NATURAL_LOG10_P = -2.0
"""A young account's rows are natural while their outlier count's binomial p-value
(against the honest rate) is above 10^this."""
SUSPECT_LOG10_P = -2.5
"""...and look like noise once it is at or below 10^this (2 outliers of 2 rows)."""


def cohort_name(tier: str | None, model: str) -> str:
    return f"{COHORT_PREFIX}{tier or ''}/{model}"


def own_score(results: Sequence[SuiteResult]) -> DetectorScore | None:
    """The account's own distribution score after the last row of the request."""
    for s in reversed(results[-1].scores if results else ()):
        if s.detector == YOUNG_DETECTOR:
            return s
    return None


def own_verdict(own: DetectorScore | None, *, graduate_rows: int) -> str:
    """``"suspect"``, ``"natural"`` or ``"unknown"``: a young account's own rows."""
    if own is None:
        return "unknown"
    log10_p = own.metrics.get("log10_p", 0.0)
    if log10_p <= SUSPECT_LOG10_P:
        return "suspect"
    if own.metrics.get("queries", 0.0) >= graduate_rows and log10_p > NATURAL_LOG10_P:
        return "natural"
    return "unknown"


def is_young(results: Sequence[SuiteResult]) -> bool:
    """Whether the account had too little evidence to be judged on its own: its
    distribution detector was not ready for some row of this request."""
    for r in results:
        for s in r.scores:
            if s.detector == YOUNG_DETECTOR and not s.ready:
                return True
    return False


class CohortWatch:
    """Observes young accounts' rows as one pooled stream per (tier, model) and
    challenges the young accounts of a flagged cohort."""

    def __init__(
        self,
        policy: ResponsePolicy,
        quota: QuotaGuard,
        *,
        audit: AuditLog | None = None,
        difficulty: int,
        newcomer_difficulty: int = DEFAULT_COHORT_DIFFICULTY,
        graduate_rows: int = DEFAULT_GRADUATE_ROWS,
    ) -> None:
        self.policy = policy
        self.quota = quota
        self.audit = audit
        self.difficulty = difficulty
        self.newcomer_difficulty = min(newcomer_difficulty, difficulty)
        self.graduate_rows = graduate_rows
        self.alerts = 0
        """Cohort flags raised by this process (not yet a Prometheus metric)."""

    def observe(
        self, suite: DetectorSuite, *, account: str, tier: str | None, model: str,
        x: np.ndarray, labels: np.ndarray, own: DetectorScore | None, now: float,
    ) -> bool:  # fmt: skip
        """Pool a young account's rows (``own``: its distribution score after them);
        return whether the account is held by its flagged cohort (it is then
        challenged; see the module docstring). Raises UnavailableError (store down)."""
        name = cohort_name(tier, model)
        top: SuiteResult | None = None
        for row, label in zip(x, labels, strict=True):
            result = suite.observe_at_time(name, model, row, int(label), now=now)
            if top is None or result.score > top.score:
                top = result
        current = self.quota.status(name, now=now)
        flagged = current.effective_at_time(now) > Status.NORMAL
        if top is not None and (flagged or top.score >= self.policy.log_at):
            # Decided like an account, hysteresis included: once honest young rows
            # dominate the pooled stream again, the cohort steps down.
            decision = self.policy.decide_at_time(current, top.scores, now=now)
            if decision.write:
                ttl = None if decision.expires_at is None else max(1.0, decision.expires_at - now)
                self.quota.apply_status(name, decision.status, reason=decision.reason,
                                        set_by=COHORT_SETTER, ttl_s=ttl,
                                        difficulty=self.difficulty, now=now)  # fmt: skip
                current = self.quota.status(name, now=now)
            if decision.changed and decision.status > decision.previous:
                self.alerts += 1
                log.warning("cohort %r of young accounts flagged: %s", name[1:], decision.reason)
                if self.audit is not None:
                    self.audit.append_status_change_at_time(
                        now, account=name[1:], model=model, previous=decision.previous.label,
                        status=decision.status.label, expires_at=decision.expires_at,
                        reason=f"cohort of young accounts: {decision.reason}",
                    )  # fmt: skip
        mine = self.quota.status(account, now=now)
        held = (
            mine.effective_at_time(now) >= Status.CHALLENGED
            and mine.set_by == COHORT_SETTER
            and mine.reason.startswith(COHORT_REASON)
        )
        verdict = own_verdict(own, graduate_rows=self.graduate_rows)
        if current.effective_at_time(now) < Status.CHALLENGED:
            # The episode is over; an account whose own rows look like noise keeps its
            # challenge until it lapses or its own detectors judge it.
            if held and verdict != "suspect":
                self._release(account, model, mine, "the cohort's episode is over", now)
            return False
        if verdict == "natural":
            if held:
                rows = int(own.metrics["queries"]) if own is not None else 0
                self._release(account, model, mine,
                              f"graduated from the cohort: its own {rows} rows are natural",
                              now)  # fmt: skip
            return False
        if verdict == "suspect":
            assert own is not None
            difficulty = self.difficulty
            reason = (
                f"{COHORT_REASON} ({name[1:]}); its own rows look like noise "
                f"({int(own.metrics['outliers'])} of {int(own.metrics['queries'])} "
                f"far from honest traffic): {current.reason}"
            )
        else:
            difficulty = self.newcomer_difficulty
            reason = f"{COHORT_REASON} ({name[1:]}): {current.reason}"
        if mine.effective_at_time(now) < Status.CHALLENGED or (
            held and (mine.difficulty or 0) < difficulty
        ):
            ttl = None if current.expires_at is None else max(1.0, current.expires_at - now)
            self.quota.apply_status(account, Status.CHALLENGED, reason=reason,
                                    set_by=COHORT_SETTER, ttl_s=ttl,
                                    difficulty=difficulty, now=now)  # fmt: skip
            self._record(account, model, mine, Status.CHALLENGED, reason, now)
        return True

    def _release(self, account: str, model: str, mine: AccountStatus, why: str, now: float) -> None:
        """Lift a challenge the cohort set on ``account`` (audited)."""
        self.quota.apply_status(account, Status.NORMAL, reason=why, set_by=COHORT_SETTER,
                                ttl_s=None, now=now)  # fmt: skip
        self._record(account, model, mine, Status.NORMAL, why, now)

    def _record(
        self, account: str, model: str, mine: AccountStatus, status: Status, why: str, now: float
    ) -> None:
        if self.audit is not None:
            self.audit.append_status_change_at_time(
                now, account=account, model=model, previous=mine.kind.label,
                status=status.label, expires_at=None, reason=why,
            )  # fmt: skip
