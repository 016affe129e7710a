"""The release side of the guard: what happens to an answer after inference.

Over 400 lines: the three steps one answer goes through, kept in their order.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np

from sealserve.defense.audit.log import AuditLog, digest_array, query_fields
from sealserve.defense.detect import DetectorSuite
from sealserve.defense.detect.base import SuiteResult
from sealserve.defense.detect.cache import StateCache
from sealserve.defense.detect.state import BlobStore
from sealserve.defense.escalation import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_COHORT_DIFFICULTY,
    DEFAULT_LIFT_GRACE_S,
    DEFAULT_REPEAT_BITS,
    ResponsePolicy,
)
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.release.beside import DEFAULT_MAX_PENDING, DetectionWorker, Observation
from sealserve.defense.release.cohort import CohortWatch, is_young, own_score
from sealserve.defense.release.hot_path import BoundProfile
from sealserve.defense.status import (
    DEFAULT_DIFFICULTY,
    DEFAULT_THROTTLE_FACTOR,
    MAX_DIFFICULTY,
    AccountStatus,
    Status,
)
from sealserve.errors import ChallengeRequiredError, InputError, SuspendedError

log = logging.getLogger("sealserve.defense")

DETECTOR = "detector"
EPOCH_HOLD_S = 1.0
"""How long a process uses a forgiveness epoch it read before reading it again."""
_EPOCHS_HELD = 65536

FORGIVEN = "forgiven"
"""The reason an operator's forgiveness starts with (detection state cleared)."""


@dataclass
class ModelDefense:
    """The output defenses of one model.

    ``input_name``: the input tensor detectors and the watermark key on (flattened per
    row). ``output_name``: the tensor the profile rewrites. ``label_name``: an output
    recomputed as the argmax of the rewritten one, so the two stay consistent.
    ``profiles`` maps tier -> profile; key ``None`` is every other tier.
    ``unsafe_undefended_outputs``: other outputs the operator declared safe to serve
    as the model computes them (every other output of a defended model is refused).
    """

    model: str
    input_name: str
    output_name: str | None = None
    label_name: str | None = None
    profiles: Mapping[str | None, BoundProfile] = field(default_factory=dict)
    suite: DetectorSuite | None = None
    unsafe_undefended_outputs: frozenset[str] = frozenset()

    def covered(self) -> frozenset[str]:
        """The output names a client may ask for."""
        names = {self.output_name, self.label_name} - {None}
        return frozenset(n for n in names if n is not None) | self.unsafe_undefended_outputs

    def to_compute(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The outputs inference must produce for ``requested`` (empty: all): always the
        defended output, so that every answer passes the defenses whatever was asked
        for. Raises InputError for an output the defenses do not cover."""
        if not requested or self.output_name is None:
            return requested
        covered = self.covered()
        for name in requested:
            if name not in covered:
                raise InputError(
                    f"output {_short(name)} of model {_short(self.model)} is not covered "
                    f"by its defenses and is not served (ask for: "
                    f"{', '.join(sorted(covered))})"
                )
        return tuple(dict.fromkeys((*requested, self.output_name)))

    def served(
        self, requested: tuple[str, ...], outputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Of the released ``outputs``, those the client asked for (and the names the
        profile derives from them: ``NAME_classes``, ``NAME_label``)."""
        if not requested:
            return outputs
        keep = set(requested)
        if self.output_name in keep:
            keep |= {f"{self.output_name}_classes", f"{self.output_name}_label"}
        return {k: v for k, v in outputs.items() if k in keep}

    def profile_for(self, tier: str | None) -> BoundProfile | None:
        return self.profiles.get(tier, self.profiles.get(None))


@dataclass
class Responses:
    """The detection policy and the parameters of the statuses it sets."""

    policy: ResponsePolicy
    throttle_factor: float = DEFAULT_THROTTLE_FACTOR
    challenge_difficulty: int = DEFAULT_DIFFICULTY
    lift_grace_s: float = DEFAULT_LIFT_GRACE_S
    """After an operator lifts or forgives an account, detection does not escalate it
    again for this long (its detectors still observe)."""
    cohort: bool = True
    """Judge young accounts of a tier together too (release/cohort.py)."""
    cohort_difficulty: int = DEFAULT_COHORT_DIFFICULTY
    """Bits of the challenge a young account of a flagged cohort answers until its own
    natural rows graduate it."""
    repeat_bits: int = DEFAULT_REPEAT_BITS
    """Bits added to a detection challenge per earlier detection challenge/suspension."""
    batch_rows: int = DEFAULT_BATCH_ROWS
    """A request of at least this many rows is judged before it is answered: a batch
    whose own rows escalate the account to challenge or suspend is not answered."""


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
        blobs: BlobStore | None = None,
        detector_state: StateCache | None = None,
        beside: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        beside_off_loop: bool = False,
    ) -> None:
        self.models = dict(models)
        # The shared store (forgiveness epochs) and the detectors' write-behind state.
        self.blobs = blobs
        self.detector_state = detector_state
        self._epochs: dict[str, tuple[int, float]] = {}  # account -> (epoch, read at)
        self.cohort = (
            CohortWatch(responses.policy, quota, audit=audit,
                        difficulty=responses.challenge_difficulty,
                        newcomer_difficulty=responses.cohort_difficulty)
            if responses is not None and quota is not None and responses.cohort
            else None
        )  # fmt: skip
        self.responses = responses
        self.quota = quota
        self.audit = audit
        self._clock = clock
        # Called after an answer carried the watermark or was recorded as a band row
        # (persist the sealed ledger).
        self.on_marked = on_marked
        # Detection beside the request path for requests below batch_rows (beside.py).
        self.worker = (
            DetectionWorker(self._observe_group, max_pending=max_pending, off_loop=beside_off_loop)
            if beside
            else None
        )

    def to_compute(self, model: str, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The outputs inference must produce for a request naming ``requested``.
        Raises InputError for an output of a defended model the defenses do not cover."""
        d = self.models.get(model)
        return requested if d is None else d.to_compute(requested)

    def served(
        self, model: str, requested: tuple[str, ...], outputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Of the released outputs, those the client asked for."""
        d = self.models.get(model)
        return outputs if d is None else d.served(requested, outputs)

    def release(
        self,
        account: str,
        tier: str | None,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        *,
        protocol: str = "grpc",
    ) -> dict[str, np.ndarray]:
        d = self.models.get(model)
        if d is None and self.audit is None:
            return outputs
        now = self._clock()
        x = _rows(inputs, d.input_name if d else None)
        decision_label: str = "ok"
        flags: dict[str, float] = {}
        later = None  # the model's output as inferred, when its rows are observed beside
        if d is not None and d.suite is not None and d.output_name in outputs:
            if self.worker is not None and not self.large_batch(len(x)):
                later = outputs[d.output_name]
            else:
                decision_label, flags = self._detect(
                    account, tier, model, d, x, outputs[d.output_name], now
                )
                self._judge_batch(account, model, x, decision_label, flags, now)
        if d is not None and d.output_name is not None and d.output_name in outputs:
            profile = d.profile_for(tier)
            if profile is not None:
                outputs, marked = _apply(profile, d, outputs, x, account, model, now)
                if marked and self.on_marked is not None:
                    self.on_marked()
        if later is not None:
            assert self.worker is not None
            # Observed and recorded beside the request path (beside.py).
            self.worker.submit(
                Observation(
                    account, tier, model, x, later, digest_array(x),
                    digest_array(_first(outputs)), now, protocol,
                )
            )  # fmt: skip
            return outputs
        if self.audit is not None:
            self.audit.append_query_at_time(
                now,
                account=account,
                model=model,
                input_sha256=digest_array(x),
                output_sha256=digest_array(_first(outputs)),
                decision=decision_label,
                flags=flags,
                protocol=protocol,
            )
            self.audit.maybe_checkpoint_at_time(now)
        return outputs

    def _observe_group(self, group: Sequence[Observation]) -> None:
        """The detection worker's step: observe each queued request's rows (in the
        order they were answered), decide, and record the group's query records with
        one write."""
        records = []
        for obs in group:
            d = self.models[obs.model]
            try:
                decision, flags = self._detect(
                    obs.account, obs.tier, obs.model, d, obs.x, obs.probs, obs.now
                )
            except Exception:  # the store down: the answer is recorded all the same
                log.exception("detection of a request by %s failed", _short(obs.account))
                decision, flags = "unobserved", {}
            records.append((obs.now, query_fields(
                obs.account, obs.model, obs.input_sha256, obs.output_sha256, decision, flags,
                obs.protocol,
            )))  # fmt: skip
        if self.audit is not None:
            self.audit.append_queries(records)
            self.audit.maybe_checkpoint_at_time(records[-1][0])

    def _detect(
        self, account: str, tier: str | None, model: str, d: ModelDefense, x: np.ndarray,
        probs: np.ndarray, now: float,
    ) -> tuple[str, dict[str, float]]:  # fmt: skip
        assert d.suite is not None
        labels = np.argmax(probs.reshape(len(x), -1), axis=1) if probs.ndim > 1 else (
            (probs.reshape(-1) >= 0.5).astype(np.int64))  # fmt: skip
        top = None
        subject = self._subject(account)
        results = []
        for row, label in zip(x, labels, strict=True):
            result = d.suite.observe_at_time(subject, model, row, int(label), now=now)
            results.append(result)
            if top is None or result.score > top.score:
                top = result
        label, flags = self._decide(account, model, top, now)
        # The aggregate view: young accounts' rows are judged together too.
        if (
            self.cohort is not None
            and is_young(results)
            and self.cohort.observe(d.suite, account=account, tier=tier, model=model, x=x,
                                    labels=labels, own=own_score(results), now=now)
            and Status.parse(label) < Status.CHALLENGED
        ):  # fmt: skip
            label = Status.CHALLENGED.label
        return label, flags

    def _decide(
        self, account: str, model: str, top: SuiteResult | None, now: float
    ) -> tuple[str, dict[str, float]]:
        """The account's own verdict from its highest-scoring row."""
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
            operator_set
            and current.kind is Status.NORMAL
            and current.set_at > 0
            and now - current.set_at < self.responses.lift_grace_s
        ):
            # An operator's lift or forgiveness holds for its grace period.
            return Status.NORMAL.label, top.flags()
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

    def _subject(self, account: str) -> str:
        """The name the account's detector state is kept under: the account, followed
        by its forgiveness epoch once an operator has forgiven it (a fresh state; the
        old one lapses with its TTL)."""
        epoch = self._epoch(account)
        return account if epoch == 0 else f"{account}\x00{epoch}"

    def _epoch(self, account: str) -> int:
        """The account's forgiveness epoch, read from the store at most once per
        EPOCH_HOLD_S per process (a forgiveness made through another replica takes
        effect here within that)."""
        now = time.monotonic()
        held = self._epochs.get(account)
        if held is not None and now - held[1] < EPOCH_HOLD_S:
            return held[0]
        epoch = self._read_epoch(account)
        if len(self._epochs) >= _EPOCHS_HELD:
            self._epochs.clear()
        self._epochs[account] = (epoch, now)
        return epoch

    def _read_epoch(self, account: str) -> int:
        blobs = self._blobs()
        raw = blobs.get_blob(_epoch_key(account)) if blobs is not None else None
        return int(raw.decode("ascii")) if raw else 0

    def _blobs(self) -> BlobStore | None:
        return self.blobs

    def forgive(self, account: str, *, by: str, now: float | None = None) -> int:
        """Clear ``account``'s detector state (every model), set it back to normal and
        say so in the audit log. Returns the new forgiveness epoch. Detection does not
        escalate it again for ``lift_grace_s``. Raises UnavailableError (store down)."""
        now = self._clock() if now is None else now
        blobs = self._blobs()
        epoch = self._read_epoch(account) + 1
        if blobs is not None:
            blobs.put_blob(_epoch_key(account), str(epoch).encode("ascii"), ttl_s=None)
        self._epochs[account] = (epoch, time.monotonic())
        previous, _ = self._current(account, now)
        reason = f"{FORGIVEN} by {by}: detector state cleared (epoch {epoch})"
        if self.quota is not None:
            self.quota.apply_status(account, Status.NORMAL, reason=reason, set_by=by, now=now)
        if self.audit is not None:
            self.audit.append_status_change_at_time(
                now, account=account, model="*", previous=previous.kind.label,
                status=Status.NORMAL.label, expires_at=None, reason=reason,
            )  # fmt: skip
        log.warning("account %s: %s", account, reason)
        return epoch

    def close(self) -> None:
        """Observe and record what is queued for detection, then write the detectors'
        changed state to the store (at a graceful stop)."""
        if self.worker is not None:
            self.worker.close()
        if self.detector_state is not None:
            self.detector_state.close()

    def large_batch(self, rows: int) -> bool:
        """Whether a request of ``rows`` rows is judged before it is answered."""
        r = self.responses
        return r is not None and rows >= r.batch_rows

    def _judge_batch(
        self, account: str, model: str, x: np.ndarray, decision: str, flags: dict[str, float],
        now: float,
    ) -> None:  # fmt: skip
        """A large batch whose own rows escalated the account to challenge or suspend
        is refused whole (its rows are already counted and observed)."""
        rows = len(x)
        if not self.large_batch(rows) or decision not in (
            Status.CHALLENGED.label,
            Status.SUSPENDED.label,
        ):
            return
        if self.audit is not None:
            self.audit.append_query_at_time(
                now, account=account, model=model, input_sha256=digest_array(x),
                output_sha256=digest_array(np.zeros(0)), decision=f"refused-{decision}",
                flags={"rows": float(rows), **flags},
            )  # fmt: skip
        if decision == Status.SUSPENDED.label:
            raise SuspendedError(
                f"account is suspended: this batch of {rows} rows was not answered"
            )
        raise ChallengeRequiredError(
            f"account must now solve a proof-of-work challenge: this batch of {rows} rows "
            "was not answered",
            challenge=self.quota.issue_challenge(account, rows=rows, now=now)
            if self.quota is not None
            else "",
        )

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
        difficulty = r.challenge_difficulty
        if status is Status.CHALLENGED:
            difficulty = self._repeat_difficulty(account)
        self.quota.apply_status(account, status, reason=reason, set_by=DETECTOR, ttl_s=ttl,
                                factor=r.throttle_factor, difficulty=difficulty,
                                now=now)  # fmt: skip

    def _repeat_difficulty(self, account: str) -> int:
        """Challenges get harder with repeated suspicion: the base difficulty plus
        ``repeat_bits`` per earlier challenge or suspension detection set (docs/defenses.md,
        "Challenges with teeth")."""
        assert self.quota is not None and self.responses is not None
        r = self.responses
        history = self.quota.history(account)  # newest first
        if history and history[0].kind is Status.CHALLENGED and history[0].difficulty:
            return history[0].difficulty  # a renewal keeps the episode's difficulty
        strikes, later = 0, Status.NORMAL
        for st in history:
            if st.reason.startswith(FORGIVEN):
                break  # forgiveness clears the record
            if st.set_by == DETECTOR and st.kind >= Status.CHALLENGED > later:
                strikes += 1  # the start of one episode of suspicion
            later = st.kind
        return min(MAX_DIFFICULTY, r.challenge_difficulty + r.repeat_bits * strikes)


def _epoch_key(account: str) -> str:
    return f"detect-epoch/{quote(account, safe='')}"


def _short(text: str, limit: int = 32) -> str:
    """Client input quoted short: a prefix and its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


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
