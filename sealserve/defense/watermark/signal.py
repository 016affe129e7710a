"""The signal watermark: a keyed linear tilt of every answer, learnable by any replica.

Why a second watermark
----------------------
The DAWN-style watermark (:mod:`sealserve.defense.watermark.marks`) relabels a small, keyed,
*scattered* set of inputs. A replica with enough capacity (an MLP, a tree ensemble)
memorises those points and reproduces them; a linear replica (logistic regression)
cannot: each marked point sits among many correctly answered neighbours and one
hyperplane per class cannot single it out. Measured on the demo task, a logistic
regression trained on 10,000 defended answers reproduced none of the marks.

What a linear replica *does* learn is any linear function of the input that is present
in every answer. So every answer carries a faint keyed one: the model's logits are
shifted by ``strength * W f(x)``, where ``f(x) = (x / input_scale, 1)`` (the input
flattened, plus a bias feature) and ``W`` is a secret matrix of independent Gaussian
entries with variance ``1 / (d + 1)``, drawn from a per-model seed derived from the
watermark key. For probabilities this multiplies each class by ``exp(tilt)`` and
renormalises; for a score in [0, 1] it shifts the score's logit. The tilt is a
deterministic function of the input: repeating or jittering a query returns (nearly)
the same answer, and averaging repeats cannot remove a bias that is the same every
time. With ``preserve_top1`` (the default profile) no honest user's label changes.

A replica trained on the probabilities learns ``W`` along with the model, so where the
original is undecided between two classes (its decision boundaries) the replica leans
towards the class ``W`` favours.

The test, and why its null distribution is exact
------------------------------------------------
The ledger keeps a sample of each account's queries that lie near the model's decision
boundaries (chosen by keyed bits independent of ``W`` and by the original model's own
top-1/top-2 margin), with the original answer. The verifier replays them and forms a
matrix ``M`` from the suspect's answers and the original's:

* when the suspect returns probabilities, logits or scores,
  ``M = (sum_i (s_i - o_i) f(x_i)^T) G^-1``, with ``s_i``/``o_i`` the suspect's and the
  original's centred log-scores (:func:`log_scores`) and ``G`` the probes' feature Gram
  matrix plus a small ridge (so that the replica's own smooth misfit weighs less);
* from labels only, ``M = sum_i (e_{a_i} - e_{o_i}) f(x_i)^T``.

The statistic is ``S = <W, M>``. If the suspect never saw our answers it is
independent of ``W``, so ``M`` is a fixed matrix and ``S`` is exactly Gaussian with
mean 0 and variance ``||M||^2 / (d + 1)`` (a linear combination of independent
Gaussians). The p-value is the upper tail of ``z = S / sd``: no assumption about how an
innocent model was trained, no estimated chance rate. A replica's answers lean the way
``W`` pushed them, so its ``z`` is large.

What it proves and what it does not: that the suspect's decisions lean along our secret
``W``, i.e. that it learnt from answers of this model. ``W`` is per model, not per
account; the probes come from the account's own queries and the DAWN marks are
per account.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

import numpy as np

from sealserve.defense.outputs import OutputKind, OutputSpec
from sealserve.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_PROBES",
    "DEFAULT_PROBE_FRACTION",
    "DEFAULT_SCORE_STRENGTH",
    "DEFAULT_STRENGTH",
    "MAX_STRENGTH",
    "Signal",
    "SignalSpec",
    "check_strength",
    "log_scores",
]

DEFAULT_STRENGTH = 3.0
"""Scale of the logit tilt. On the demo task (64 features in [0, 1]) the tilt's standard
deviation per class is about ``0.3 * strength``; with preserve_top1 no top-1 label
changes, and the default profile's mean absolute probability change goes from 0.018
(noise and rounding alone) to 0.023."""

DEFAULT_SCORE_STRENGTH = 0.5
"""The default for a score in [0, 1]: its users read the score itself, and a perfect
copy of the answers is proven as well at 0.5 as at 3 (the test is scale-free), while
with preserve_top1 a strong tilt near the threshold is reflected and blurs the signal.
On a synthetic fraud-style score the mean |change| is 0.034."""

MAX_STRENGTH = 8.0
DEFAULT_PROBE_FRACTION = 0.2
"""Share of queries considered as boundary probes (a keyed hash picks them)."""
DEFAULT_MAX_PROBES = 1000
"""Probes kept per account and model: the ones nearest a decision boundary."""

_TILT_LIMIT = 20.0  # |logit shift| cap, so that wild inputs cannot overflow exp()


_LOG_FLOOR = 1e-2


def log_scores(values: np.ndarray, kind: OutputKind | str) -> np.ndarray:
    """Answers as the signal test compares them: (n, classes) centred log-probabilities
    (floored at 0.01, so that tiny values do not dominate) or centred logits; for
    scores in [0, 1], (n, 1) logits."""
    kind = OutputKind(kind)
    v = np.asarray(values, dtype=np.float64)
    if kind is OutputKind.SCORE:
        sc = np.clip(v.reshape(-1), _LOG_FLOOR, 1.0 - _LOG_FLOOR)
        return np.log(sc / (1.0 - sc)).reshape(-1, 1)
    v = v.reshape(len(v), -1)
    if kind is OutputKind.PROBABILITIES:
        v = np.log(np.maximum(v, _LOG_FLOOR))
    out: np.ndarray = v - v.mean(axis=1, keepdims=True)
    return out


def check_strength(strength: object, output: OutputSpec) -> float:
    """Return ``strength`` as a float if it is in [0, MAX_STRENGTH] and applies.

    Raises:
        ConfigError: not a number, out of range, or a non-zero strength on an
            unbounded score (there is no logit to tilt).
    """
    if (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not (0.0 <= strength <= MAX_STRENGTH)
    ):
        raise ConfigError(
            f"watermark.signal must be a number in [0, {MAX_STRENGTH}] (0 turns it off), "
            f"got {strength!r}"
        )
    if strength > 0 and output.is_score and output.bounds != (0.0, 1.0):
        raise ConfigError(
            "watermark.signal needs probabilities, logits or a score bounded to [0, 1]; "
            "set watermark.signal = 0 for this output"
        )
    return float(strength)


@dataclass(frozen=True)
class SignalSpec:
    """What the verifier needs to rebuild ``W`` for one model: kept in the sealed
    ledger (``seed`` is secret; it is per model, derived from the watermark key)."""

    model: str
    seed: bytes
    strength: float
    input_scale: float
    classes: int
    """The class count; 1 for a score."""
    threshold: float = 0.5
    """For a score, the decision threshold (labels are ``score > threshold``)."""
    kind: str = "probabilities"
    """The model's output kind (an :class:`OutputKind` value)."""

    def __post_init__(self) -> None:
        if len(self.seed) < 16:
            raise ConfigError("signal watermark seed must be at least 16 bytes")
        if self.classes < 1:
            raise ConfigError(f"signal watermark: classes must be >= 1, got {self.classes}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ConfigError(f"signal watermark: bad input_scale {self.input_scale!r}")
        if self.kind not in {k.value for k in OutputKind}:
            raise ConfigError(f"signal watermark: unknown output kind {self.kind!r}")

    @property
    def rows(self) -> int:
        """Rows of :meth:`matrix`: the class count, or 2 for a score (below/above)."""
        return 2 if self.classes == 1 else self.classes

    def matrix(self, dim: int) -> np.ndarray:
        """``W``, shape ``(rows, dim + 1)``, at unit strength: entries N(0, 1/(dim+1)).
        For a score, row 0 ("below the threshold") is all zeros."""
        if dim < 1:
            raise ConfigError(f"signal watermark: input dimension must be >= 1, got {dim}")
        material = hmac.digest(self.seed, b"W" + dim.to_bytes(8, "big"), "sha256")
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(material, "big")))
        w = rng.standard_normal((self.classes, dim + 1)) / math.sqrt(dim + 1)
        if self.classes == 1:
            w = np.vstack([np.zeros((1, dim + 1)), w])
        return w

    @property
    def random_rows(self) -> slice:
        """The rows of :meth:`matrix` that are random (all but a score's zero row)."""
        return slice(1, 2) if self.classes == 1 else slice(0, self.classes)

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """``f(x)``: the flattened inputs divided by ``input_scale``, plus a bias 1."""
        x = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1) / self.input_scale
        return np.hstack([x, np.ones((len(x), 1))])


class Signal:
    """Applies the keyed tilt to batches of outputs of one profile.

    Args:
        key: the signal secret (derive it; >= 16 bytes).
        strength: the tilt scale, in (0, MAX_STRENGTH].
        input_scale: typical range of one input feature (the profile's coarsen scale).
        output: the model output.
    """

    def __init__(
        self, *, key: bytes, strength: float, input_scale: float, output: OutputSpec
    ) -> None:
        if len(key) < 16:
            raise ConfigError("the signal watermark key must be at least 16 bytes")
        check_strength(strength, output)
        if not strength > 0:
            raise ConfigError("a Signal needs a strength > 0")
        self._key = key
        self.strength = float(strength)
        self.input_scale = float(input_scale)
        self.output = output
        self._prob = output.kind is OutputKind.PROBABILITIES
        self._score = output.is_score
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        # 0-d arrays: ufuncs take them about twice as fast as Python floats.
        self._lo, self._hi = np.array(-_TILT_LIMIT), np.array(_TILT_LIMIT)
        self._specs: dict[str, SignalSpec] = {}

    def spec(self, model: str) -> SignalSpec:
        """The verifier's view of this model's tilt (holds the per-model seed)."""
        s = self._specs.get(model)
        if s is None:
            seed = hmac.digest(self._key, len(model).to_bytes(4, "big") + model.encode(), "sha256")
            s = SignalSpec(model, seed, self.strength, self.input_scale,
                           self.output.num_classes, self.output.threshold,
                           self.output.kind.value)  # fmt: skip
            self._specs[model] = s
        return s

    def _weights(self, model: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with tilt = x @ A + b: ``W`` split, transposed and pre-scaled (for a
        score, A is a vector and b a 0-d array, so the tilt is one value per row)."""
        hit = self._cache.get((model, dim))
        if hit is None:
            w = self.spec(model).matrix(dim)
            scale = self.strength / self.input_scale
            if self._score:  # only the score's row is random
                hit = (w[1, :dim] * scale, np.array(w[1, dim] * self.strength))
            else:
                hit = (np.ascontiguousarray(w[:, :dim].T) * scale, w[:, dim] * self.strength)
            self._cache[(model, dim)] = hit
        return hit

    def apply(
        self, x: np.ndarray, inputs: np.ndarray, model: str, *, normalise: bool = True
    ) -> np.ndarray:
        """Tilt ``x`` (float64; (batch, classes) or (batch,) for scores); returns the
        tilted array (may be ``x`` itself, changed in place). ``normalise=False`` leaves
        tilted probabilities unnormalised, for a caller that renormalises later."""
        flat = inputs if inputs.ndim == 2 else inputs.reshape(len(inputs), -1)
        dim = flat.shape[1]
        if dim == 0:  # no numeric input to key on
            return x
        hit = self._cache.get((model, dim))
        a, b = hit if hit is not None else self._weights(model, dim)
        if self._score and len(x) == 1:  # one score: Python floats beat numpy calls
            tt = float(flat.dot(a)[0]) + float(b)
            # As the vector path: NaN -> the upper bound (fmin), then clamp.
            tt = _TILT_LIMIT if tt != tt else min(max(tt, -_TILT_LIMIT), _TILT_LIMIT)
            sv = float(x[0])
            num = sv * math.exp(tt)
            x[0] = num / (num + 1.0 - sv)
            return x
        t = flat.dot(a)
        t += b
        # fmin maps NaN to the bound, so a NaN input gives a finite (uniform) tilt and
        # exp() cannot overflow; a huge negative tilt only drives a value to 0.
        np.fmin(t, self._hi, out=t)
        if self._score:
            # sigmoid(logit(s) + t) = s e / (s e + 1 - s), e = exp(t): no log needed.
            np.fmax(t, self._lo, out=t)
            np.exp(t, out=t)
            num = x * t
            den = num - x
            den += 1.0
            out: np.ndarray = np.divide(num, den, out=num)
            return out
        if self._prob:
            np.exp(t, out=t)
            x *= t
            if normalise:
                total = np.add.reduce(x, axis=1, keepdims=True)
                if total.min() > 0:
                    x /= total
            return x
        x += t
        return x
