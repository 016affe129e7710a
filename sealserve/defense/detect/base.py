"""What every detector returns, and the input checks they share.

A detector observes one query (account, model, input vector, predicted label), updates
that account's state in the :class:`~sealserve.defense.detect.state.BlobStore`, and
returns a :class:`DetectorScore`: a number in [0, 1] and a sentence an operator can read.
Detectors never crash the request path on bad input: an input of the wrong size, with
NaN/inf, or a label out of range is ignored (state unchanged) and the score says so.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from sealserve.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

_LOCK_STRIPES = 64


@dataclass(frozen=True, slots=True, eq=False)
class DetectorScore:
    """One detector's verdict on an account after a query.

    ``score`` is in [0, 1] (0: nothing unusual; 1: certain extraction by this
    detector's measure). ``ready`` is False while the detector has too little evidence
    to judge (the score is then 0). ``metrics`` holds the raw numbers behind the score
    (for the audit log's flags and the owner's report). ``explain`` is the sentence, or
    a function that writes it: every row of every request is scored and almost no
    score's sentence is ever read, so detectors format it only when asked
    (:attr:`explanation`).
    """

    detector: str
    score: float
    explain: str | Callable[[], str]
    ready: bool = True
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0.0 <= self.score <= 1.0) or math.isnan(self.score):
            raise ValueError(f"score {self.score!r} outside [0, 1]")

    @property
    def explanation(self) -> str:
        """The sentence an operator reads."""
        e = self.explain
        return e if isinstance(e, str) else e()

    def __eq__(self, other: object) -> bool:
        # Equal scores say the same: the sentences compared, not the functions.
        if not isinstance(other, DetectorScore):
            return NotImplemented
        return (self.detector, self.score, self.ready, self.metrics, self.explanation) == (
            other.detector, other.score, other.ready, other.metrics, other.explanation
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.detector, self.score, self.ready, self.explanation))


class Detector(Protocol):
    """A per-account extraction detector."""

    name: str

    def observe_at_time(
        self, account: str, model: str, x: object, label: object, *, now: float
    ) -> DetectorScore:
        """Record one query seen at ``now`` (Unix seconds) and return the new score."""
        ...


def coerce_query(
    x: object, label: object, *, n_features: int, n_classes: int | None
) -> tuple[FloatArray, int] | str:
    """Return ``(vector, label)`` or, when unusable, the reason as a sentence."""
    try:
        vec = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        return f"input ignored: not numeric ({type(exc).__name__})"
    if vec.size != n_features:
        return f"input ignored: {vec.size} features, expected {n_features}"
    if not np.isfinite(vec).all():
        return "input ignored: contains NaN or infinity"
    if isinstance(label, bool):
        return "input ignored: label is not an integer class"
    try:
        lab = int(label)  # type: ignore[call-overload]
        if lab != label:
            return "input ignored: label is not an integer class"
    except (TypeError, ValueError, OverflowError):
        return "input ignored: label is not an integer class"
    if n_classes is not None and not 0 <= lab < n_classes:
        return f"input ignored: label {lab} outside 0..{n_classes - 1}"
    return vec, lab


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class SuiteResult:
    """All detectors' scores for one query; ``score`` is the highest, ``top`` its owner."""

    scores: tuple[DetectorScore, ...]

    @property
    def score(self) -> float:
        return max((s.score for s in self.scores), default=0.0)

    @property
    def top(self) -> DetectorScore | None:
        return max(self.scores, key=lambda s: s.score, default=None)

    def flags(self) -> dict[str, float]:
        """For the audit log: detector name -> score, and ``detector.metric`` -> value
        for each detector's metrics (the owner's report reads both)."""
        out = {s.detector: round(s.score, 4) for s in self.scores}
        for s in self.scores:
            for k, v in s.metrics.items():
                out[f"{s.detector}.{k}"] = round(float(v), 4)
        return out


class DetectorSuite:
    """Runs several detectors on each query (the guard calls this once per request)."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        require(len(detectors) > 0, "a detector suite needs at least one detector")
        names = [d.name for d in detectors]
        require(len(set(names)) == len(names), f"duplicate detector names in {names}")
        self.detectors = tuple(detectors)
        # Detector state may be held in process (detect/cache.py) and updated in place:
        # one account's rows are observed one request at a time.
        self._locks = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))

    def observe(self, account: str, model: str, x: object, label: object) -> SuiteResult:
        """Observe a query now; see :meth:`observe_at_time`."""
        return self.observe_at_time(account, model, x, label, now=time.time())

    def observe_at_time(
        self, account: str, model: str, x: object, label: object, *, now: float
    ) -> SuiteResult:
        """Feed the query to every detector. Raises ``UnavailableError`` on store failure."""
        with self._locks[hash(account) % _LOCK_STRIPES]:
            return SuiteResult(
                tuple(d.observe_at_time(account, model, x, label, now=now) for d in self.detectors)
            )
