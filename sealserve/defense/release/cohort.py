"""The aggregate view: young accounts of a tier judged together.

Per-account detectors need ``min_queries`` rows before they judge, so fifty accounts
of 19 uniform-noise rows each are never looked at one by one. Every row of a *young*
account (one whose distribution detector is not yet ready) is therefore also observed
in a pooled stream, one per tier and model, kept under a name no token can hold
(:data:`COHORT_PREFIX`). When the pooled stream reaches the response policy's
``challenge`` level the cohort is flagged (a status on the pooled name, with the
policy's hold time, recorded in the audit log): from then on every young account of
that tier that is seen is challenged (proof of work, set by the detector), while
accounts old enough to be judged on their own are left to their own detectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from sealserve.defense.audit.log import AuditLog
from sealserve.defense.detect import DetectorSuite
from sealserve.defense.detect.base import SuiteResult
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import Status

log = logging.getLogger("sealserve.defense")

COHORT_PREFIX = "\x00cohort/"
"""Pooled streams are kept under names starting with this (no account may)."""
COHORT_SETTER = "detector"
"""``set_by`` of the statuses the cohort view writes: detection's own (so they expire
and step down like any detector status; the reason names the cohort)."""
YOUNG_DETECTOR = "distribution"


def cohort_name(tier: str | None, model: str) -> str:
    return f"{COHORT_PREFIX}{tier or ''}/{model}"


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
    ) -> None:
        self.policy = policy
        self.quota = quota
        self.audit = audit
        self.difficulty = difficulty
        self.alerts = 0
        """Cohort flags raised by this process (not yet a Prometheus metric)."""

    def observe(
        self, suite: DetectorSuite, *, account: str, tier: str | None, model: str,
        x: np.ndarray, labels: np.ndarray, now: float,
    ) -> bool:  # fmt: skip
        """Pool a young account's rows; return whether its cohort is flagged (the
        account is then challenged). Raises UnavailableError (store down)."""
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
        if current.effective_at_time(now) < Status.CHALLENGED:
            return False
        mine = self.quota.status(account, now=now)
        if mine.effective_at_time(now) < Status.CHALLENGED:
            reason = f"young account in a flagged cohort ({name[1:]}): {current.reason}"
            ttl = None if current.expires_at is None else max(1.0, current.expires_at - now)
            self.quota.apply_status(account, Status.CHALLENGED, reason=reason,
                                    set_by=COHORT_SETTER, ttl_s=ttl,
                                    difficulty=self.difficulty, now=now)  # fmt: skip
            if self.audit is not None:
                self.audit.append_status_change_at_time(
                    now, account=account, model=model, previous=mine.kind.label,
                    status=Status.CHALLENGED.label, expires_at=None, reason=reason,
                )  # fmt: skip
        return True
