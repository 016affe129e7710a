"""The release side of the guard: what happens to an answer after inference.

Per defended model, in this order:
1. **detect** — each row of the request is observed by the account's detectors
   (PRADA, distribution, volume); the graduated-response policy maps the score to a
   status (throttle, challenge, suspend), written to the shared state store so the
   next admission on any replica applies it;
2. **perturb and watermark** — the account's tier picks a profile; the answer is
   rewritten (rounding, keyed noise, reverse sigmoid, top-k, label only) and a keyed
   fraction of inputs gets the watermark answer, recorded in the sealed ledger;
3. **audit** — digests of input and output, the decision and detector flags are
   appended to the signed, hash-chained audit log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from sealserve.defense.audit.log import AuditLog, digest_array
from sealserve.defense.detect import DetectorSuite
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.release.hot_path import BoundProfile
from sealserve.defense.status import (
    DEFAULT_DIFFICULTY,
    DEFAULT_THROTTLE_FACTOR,
    AccountStatus,
    Status,
)

log = logging.getLogger("sealserve.defense")

DETECTOR = "detector"


@dataclass
class ModelDefense:
    """The output defenses of one model.

    ``input_name``: the input tensor detectors and the watermark key on (flattened per
    row). ``output_name``: the tensor the profile rewrites. ``label_name``: an output
    recomputed as the argmax of the rewritten one, so the two stay consistent.
    ``profiles`` maps tier -> profile; key ``None`` is every other tier.
    """

    model: str
    input_name: str
    output_name: str | None = None
    label_name: str | None = None
    profiles: Mapping[str | None, BoundProfile] = field(default_factory=dict)
    suite: DetectorSuite | None = None

    def profile_for(self, tier: str | None) -> BoundProfile | None:
        return self.profiles.get(tier, self.profiles.get(None))


@dataclass
class Responses:
    """The detection policy and the parameters of the statuses it sets."""

    policy: ResponsePolicy
    throttle_factor: float = DEFAULT_THROTTLE_FACTOR
    challenge_difficulty: int = DEFAULT_DIFFICULTY


class OutputDefenses:
    def __init__(
        self,
        models: Mapping[str, ModelDefense],
        *,
        responses: Responses | None = None,
        quota: QuotaGuard | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        on_marked: Callable[[], None] | None = None,
    ) -> None:
        self.models = dict(models)
        self.responses = responses
        self.quota = quota
        self.audit = audit
        self._clock = clock
        # Called after an answer carried the watermark or was recorded as a band row
        # (persist the sealed ledger).
        self.on_marked = on_marked

    def release(
        self,
        account: str,
        tier: str | None,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        d = self.models.get(model)
        if d is None and self.audit is None:
            return outputs
        now = self._clock()
        x = _rows(inputs, d.input_name if d else None)
        decision_label: str = "ok"
        flags: dict[str, float] = {}
        if d is not None and d.suite is not None and d.output_name in outputs:
            decision_label, flags = self._detect(account, model, d, x, outputs[d.output_name], now)
        if d is not None and d.output_name is not None and d.output_name in outputs:
            profile = d.profile_for(tier)
            if profile is not None:
                outputs, marked = _apply(profile, d, outputs, x, account, model, now)
                if marked and self.on_marked is not None:
                    self.on_marked()
        if self.audit is not None:
            self.audit.append_query_at_time(
                now,
                account=account,
                model=model,
                input_sha256=digest_array(x),
                output_sha256=digest_array(_first(outputs)),
                decision=decision_label,
                flags=flags,
            )
            self.audit.maybe_checkpoint_at_time(now)
        return outputs

    def _detect(
        self, account: str, model: str, d: ModelDefense, x: np.ndarray, probs: np.ndarray,
        now: float,
    ) -> tuple[str, dict[str, float]]:  # fmt: skip
        assert d.suite is not None
        labels = np.argmax(probs.reshape(len(x), -1), axis=1) if probs.ndim > 1 else (
            (probs.reshape(-1) >= 0.5).astype(np.int64))  # fmt: skip
        top = None
        for row, label in zip(x, labels, strict=True):
            result = d.suite.observe_at_time(account, model, row, int(label), now=now)
            if top is None or result.score > top.score:
                top = result
        if top is None or self.responses is None:
            return "ok", top.flags() if top else {}
        policy = self.responses.policy
        if top.score < policy.log_at:
            return "ok", top.flags()
        current, set_by = self._current(account, now)
        decision = policy.decide_at_time(current, top.scores, now=now)
        # Never weaken a status an operator set; detection only adds to it.
        operator_set = set_by not in ("", DETECTOR)
        if (
            decision.write
            and self.quota is not None
            and (decision.status > current.kind or not operator_set)
        ):
            self._write(account, decision.status, decision.reason, decision.expires_at, now)
        if decision.changed:
            log.warning("account %s: %s -> %s (%s)", account, decision.previous.label,
                        decision.status.label, decision.reason)  # fmt: skip
            if self.audit is not None:
                self.audit.append_status_change_at_time(
                    now, account=account, model=model, previous=decision.previous.label,
                    status=decision.status.label, expires_at=decision.expires_at,
                    reason=decision.reason,
                )  # fmt: skip
        return decision.status.label, top.flags()

    def _current(self, account: str, now: float) -> tuple[AccountStatus, str]:
        """The account's status, and who set it."""
        if self.quota is None:
            return AccountStatus(), ""
        st = self.quota.status(account, now=now)
        return st, st.set_by

    def _write(
        self, account: str, status: Status, reason: str, expires_at: float | None, now: float
    ) -> None:
        assert self.quota is not None and self.responses is not None
        ttl = None if expires_at is None else max(1.0, expires_at - now)
        r = self.responses
        self.quota.apply_status(account, status, reason=reason, set_by=DETECTOR, ttl_s=ttl,
                                factor=r.throttle_factor, difficulty=r.challenge_difficulty,
                                now=now)  # fmt: skip


def _rows(inputs: Mapping[str, np.ndarray], name: str | None) -> np.ndarray:
    """The request's input as (batch, features) float64: the named tensor, or all
    inputs flattened and concatenated per row."""
    if name is not None and name in inputs:
        arr = inputs[name]
        return np.asarray(arr, dtype=np.float64).reshape(arr.shape[0] if arr.ndim else 1, -1)
    parts = [np.asarray(a, dtype=np.float64).reshape(a.shape[0] if a.ndim else 1, -1)
             for a in inputs.values() if a.dtype != np.object_]  # fmt: skip
    return np.concatenate(parts, axis=1) if parts else np.zeros((1, 0))


def _first(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    for value in outputs.values():
        if value.dtype != np.object_:
            return value
    return np.zeros(0)


def _apply(
    profile: BoundProfile,
    d: ModelDefense,
    outputs: dict[str, np.ndarray],
    x: np.ndarray,
    account: str,
    model: str,
    now: float,
) -> tuple[dict[str, np.ndarray], bool]:
    assert d.output_name is not None
    original = outputs[d.output_name]
    rel = profile.apply_at_time(original, inputs=x, account=account, model=model, now=now)
    out = dict(outputs)
    if rel.form == "full":
        values = rel.values.reshape(original.shape).astype(original.dtype)
        out[d.output_name] = values
        labels = np.argmax(values, axis=1) if values.ndim == 2 else None
    elif rel.form == "top_k":
        assert rel.indices is not None
        out[d.output_name] = rel.values.astype(original.dtype)
        out[f"{d.output_name}_classes"] = rel.indices.astype(np.int64)
        labels = rel.indices[:, 0]
    else:  # label only: the scores are not released at all
        del out[d.output_name]
        labels = rel.values.astype(np.int64)
        if d.label_name is None:
            out[f"{d.output_name}_label"] = labels
    if d.label_name is not None and d.label_name in out and labels is not None:
        out[d.label_name] = labels.astype(out[d.label_name].dtype)
    # Band rows are recorded whether flipped or not: they too make the ledger dirty.
    return out, bool(np.any(rel.marked)) or rel.band_rows > 0
