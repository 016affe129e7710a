"""Output perturbation: composable transforms on model answers, grouped in profiles.

A :class:`Profile` is built from one named table of the server config
(:meth:`Profile.from_mapping`), validated against the model's :class:`OutputSpec` at
build time, and bound to its secret key (from sealed state) and the watermark ledger
with :meth:`Profile.bind`. The guard then calls :meth:`BoundProfile.apply` on each
batch of outputs after inference.

The transforms run in one fixed order, whatever the order of the config keys, because
only that order makes sense (noise before rounding, the top-1 check after everything
that can move it)::

    watermark -> signal tilt -> keyed noise -> reverse sigmoid -> renormalise -> top-k
      -> round -> preserve top-1 -> label only

(with top-k, the top-1 is also restored before top-k so that it is among the kept).

* watermark -- DAWN-style marks on a keyed fraction of inputs and the keyed linear
  "signal" tilt on every answer (:mod:`sealserve.defense.watermark.marks`,
  :mod:`sealserve.defense.watermark.signal`).
* :class:`KeyedNoise` -- Gaussian or Laplace noise of a given scale whose seed is
  ``BLAKE2b(key=noise_key, account || model || coarsened input)``
  (:mod:`sealserve.defense.release.coarsen`; keyed BLAKE2b is a PRF, and about three times
  cheaper than HMAC-SHA256 on these short messages). The digest's bytes
  (SHAKE-256-expanded beyond 32 values) are 16-bit indices into a precomputed table
  of inverse-CDF quantiles. The same account asking the same (or a jittered,
  same-cell) input gets the same noise, so averaging repeats gains nothing; another
  account gets other noise.
* :class:`ReverseSigmoid` -- Lee et al., "Defending Against NN Model Stealing Attacks
  Using Deceptive Perturbations", IEEE S&P Workshops 2019:
  ``y_hat = alpha * (y - beta * (sigmoid(gamma * logit(y)) - 1/2))``, clipped to
  [0, 1], with ``alpha`` normalising the vector to sum 1.
* renormalise -- probabilities are clipped at 0 and divided by their sum.
* preserve top-1 -- the final top-1 label (``numpy.argmax``) equals the top-1 of the
  answer the pipeline started from; for scores, the side of the threshold is kept.
* :class:`TopK` -- keep the k largest values; ``mode="zero"`` zeroes the rest,
  ``mode="omit"`` returns only them with their class indices.
* :class:`Round` -- round to ``decimals`` decimals.
* label only -- return the top-1 label (scores: 1 above the threshold, else 0).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Literal

import numpy as np
from scipy.special import ndtri

from sealserve.defense.outputs import OutputKind, OutputSpec
from sealserve.defense.release.coarsen import DEFAULT_RELATIVE_STEP, Coarsener
from sealserve.defense.watermark.marks import (
    DEFAULT_FRACTION,
    DEFAULT_SCORE_MARGIN,
    LedgerEntry,
    Marks,
    ProbeEntry,
    Watermark,
    WatermarkLedger,
    check_fraction,
    check_margin,
)
from sealserve.defense.watermark.signal import (
    DEFAULT_PROBE_FRACTION,
    DEFAULT_SCORE_STRENGTH,
    DEFAULT_STRENGTH,
    Signal,
    check_strength,
)
from sealserve.errors import ConfigError

__all__ = [
    "DEFAULT_PROFILE",
    "BoundProfile",
    "KeyedNoise",
    "Profile",
    "Release",
    "ReverseSigmoid",
    "Round",
    "TopK",
    "derive_key",
]

DEFAULT_PROFILE: dict[str, Any] = {
    "noise": {"dist": "laplace", "scale": 0.02},
    "renormalise": True,
    "preserve_top1": True,
    "round": 3,
    "watermark": {"fraction": DEFAULT_FRACTION},
}
"""The default profile (probability outputs). For logits and scores the transforms
that do not apply (renormalise) are dropped by :meth:`Profile.default`."""

_KEYS = frozenset(
    {
        "output",
        "coarsen",
        "noise",
        "reverse_sigmoid",
        "renormalise",
        "preserve_top1",
        "top_k",
        "round",
        "label_only",
        "watermark",
    }
)


_LEVELS = 1 << 16
_ZERO = np.array(0.0)
_ALL = np.ones(0, dtype=bool)  # sentinel: "every row" (compared by identity)


def derive_key(root: bytes, purpose: str) -> bytes:
    """A per-purpose subkey: ``HMAC-SHA256(root, "sealserve/defense/<purpose>/v1")``."""
    return hmac.digest(root, f"sealserve/defense/{purpose}/v1".encode(), "sha256")


@dataclass(frozen=True)
class Round:
    """Round every value to ``decimals`` decimals (0..10)."""

    decimals: int

    def __post_init__(self) -> None:
        if isinstance(self.decimals, bool) or not isinstance(self.decimals, int):
            raise ConfigError(f"round.decimals must be an integer, got {self.decimals!r}")
        if not 0 <= self.decimals <= 10:
            raise ConfigError(f"round.decimals must be in 0..10, got {self.decimals}")

    @property
    def unit(self) -> float:
        return float(10.0**-self.decimals)


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest values; ``mode`` "zero" zeroes the others, "omit" drops them."""

    k: int
    mode: Literal["zero", "omit"] = "zero"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"top_k.k must be an integer >= 1, got {self.k!r}")
        if self.mode not in ("zero", "omit"):
            raise ConfigError(f"top_k.mode must be 'zero' or 'omit', got {self.mode!r}")


@dataclass(frozen=True)
class KeyedNoise:
    """Deterministic keyed noise: ``dist`` "gaussian" (sd = scale) or "laplace" (b = scale)."""

    dist: Literal["gaussian", "laplace"]
    scale: float

    def __post_init__(self) -> None:
        if self.dist not in ("gaussian", "laplace"):
            raise ConfigError(f"noise.dist must be 'gaussian' or 'laplace', got {self.dist!r}")
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not math.isfinite(self.scale)
            or self.scale <= 0
        ):
            raise ConfigError(f"noise.scale must be a finite number > 0, got {self.scale!r}")

    def table(self) -> np.ndarray:
        """The noise quantiles ``scale * F^-1((k + 1/2) / 2^16)``, k = 0 .. 2^16 - 1.

        Sampling looks a 16-bit keyed integer up in this table: the noise takes one of
        65,536 equiprobable values (tails cut at about 4.3 sd for Gaussian, 11.1 b for
        Laplace), which is plenty for a defense and costs two numpy calls per request.
        """
        u = (np.arange(_LEVELS, dtype=np.float64) + 0.5) / _LEVELS
        if self.dist == "gaussian":
            z: np.ndarray = ndtri(u)
        else:
            c = u - 0.5
            z = -np.sign(c) * np.log1p(-2.0 * np.abs(c))
        return z * self.scale

    def sample(self, digests: list[bytes], width: int, table: np.ndarray) -> np.ndarray:
        """Noise of shape (len(digests), width) from per-row secret digests.

        Each digest gives one 16-bit index per value (its own bytes when it is long
        enough, else its SHAKE-256 expansion), looked up in :meth:`table` (computed
        once per bound profile).
        """
        need = 2 * width
        if digests and len(digests[0]) >= need:
            raw = b"".join([d[:need] for d in digests])
        else:
            raw = b"".join([hashlib.shake_256(d).digest(need) for d in digests])
        z: np.ndarray = table[np.frombuffer(raw, dtype="<u2")]
        return z.reshape(len(digests), width)

    @staticmethod
    def digest_size(width: int) -> int:
        """Bytes of keyed digest per row: 2 per value, between 16 and 64."""
        return max(16, min(64, 2 * width))


@dataclass(frozen=True)
class ReverseSigmoid:
    """Lee et al. (2019) reverse-sigmoid perturbation with magnitude ``beta`` and
    convergence ``gamma``: ``y_hat = alpha (y - beta (sigmoid(gamma logit y) - 1/2))``."""

    beta: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"reverse_sigmoid.{name} must be a number, got {v!r}")
            if v <= 0:
                raise ConfigError(f"reverse_sigmoid.{name} must be > 0, got {v!r}")

    def __call__(self, y: np.ndarray) -> np.ndarray:
        p = np.clip(y, 1e-12, 1.0 - 1e-12)
        logit = np.log(p) - np.log1p(-p)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        out = np.clip(y - r, 0.0, 1.0)
        total = out.sum(axis=-1, keepdims=True)
        res: np.ndarray = np.divide(
            out, total, out=np.full_like(out, 1.0 / out.shape[-1]), where=total > 0
        )
        return res


@dataclass(slots=True)
class Release:
    """What the guard encodes: the perturbed answer and which rows carry the watermark.

    ``form`` is "full" (``values`` has the model's output shape), "top_k" (``values``
    is (batch, k), descending, with class ``indices`` (batch, k)) or "label"
    (``values`` is int64 (batch,)).
    """

    values: np.ndarray
    marked: np.ndarray
    form: Literal["full", "top_k", "label"] = "full"
    indices: np.ndarray | None = None


@dataclass(frozen=True)
class Profile:
    """A validated, key-free defense profile. Build with :meth:`from_mapping` or
    :meth:`default`; get the per-request object with :meth:`bind`."""

    name: str
    output: OutputSpec
    coarsener: Coarsener = field(default_factory=lambda: Coarsener.from_scale())
    noise: KeyedNoise | None = None
    reverse_sigmoid: ReverseSigmoid | None = None
    renormalise: bool = False
    preserve_top1: bool = False
    top_k: TopK | None = None
    round: Round | None = None
    label_only: bool = False
    watermark_fraction: float | None = None
    watermark_margin: float = DEFAULT_SCORE_MARGIN
    watermark_signal: float = 0.0
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        out, kind = self.output, self.output.kind
        where = f"defense profile {self.name!r}"
        if self.top_k is not None:
            if out.is_score:
                raise ConfigError(f"{where}: top_k does not apply to a score output")
            if self.top_k.k > out.num_classes:
                raise ConfigError(
                    f"{where}: top_k.k = {self.top_k.k} is larger than the model's "
                    f"{out.num_classes} classes"
                )
            if kind is OutputKind.LOGITS and self.top_k.mode == "zero":
                raise ConfigError(
                    f"{where}: top_k mode 'zero' is meaningless for logits; use mode 'omit'"
                )
        if self.renormalise and kind is not OutputKind.PROBABILITIES:
            raise ConfigError(f"{where}: renormalise applies only to probability outputs")
        if self.reverse_sigmoid is not None and not (
            kind is OutputKind.PROBABILITIES or (out.is_score and out.bounds == (0.0, 1.0))
        ):
            raise ConfigError(
                f"{where}: reverse_sigmoid needs probabilities (or a score bounded to [0, 1])"
            )
        if self.label_only and (self.top_k is not None or self.round is not None):
            raise ConfigError(f"{where}: label_only returns labels; drop top_k and round")
        if self.watermark_fraction is not None:
            check_fraction(self.watermark_fraction)
            check_margin(self.watermark_margin, out)
            check_strength(self.watermark_signal, out)
        elif self.watermark_signal:
            raise ConfigError(f"{where}: watermark_signal is set without a watermark")

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, name: str, mapping: Mapping[str, Any], *, output: OutputSpec) -> Profile:
        """Build and validate a profile from its config table (see docs).

        Raises:
            ConfigError: unknown key, wrong type, impossible parameter, or a transform
                that does not apply to ``output`` (named in the message).
        """
        where = f"defense profile {name!r}"
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where} must be a table, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - _KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}"
            )
        m = dict(mapping)
        if "output" in m and m["output"] != output.kind.value:
            raise ConfigError(
                f"{where} is for {m['output']!r} outputs but the model's output is "
                f"{output.kind.value!r}"
            )
        try:
            coarsen = _table(m, "coarsen", where, {"input_scale", "relative_step"}) or {}
            noise = _table(m, "noise", where, {"dist", "scale"})
            rs = _table(m, "reverse_sigmoid", where, {"beta", "gamma"})
            top_k_v = m.get("top_k")
            if isinstance(top_k_v, int) and not isinstance(top_k_v, bool):
                top_k_v = {"k": top_k_v}
            top_k = _table({"top_k": top_k_v}, "top_k", where, {"k", "mode"})
            rnd_v = m.get("round")
            if isinstance(rnd_v, int) and not isinstance(rnd_v, bool):
                rnd_v = {"decimals": rnd_v}
            rnd = _table({"round": rnd_v}, "round", where, {"decimals"})
            wm_v = m.get("watermark")
            wm = _table(
                {"watermark": {} if wm_v is True else wm_v},
                "watermark",
                where,
                {"fraction", "margin", "signal"},
            )
            return cls(
                name=name,
                output=output,
                coarsener=Coarsener.from_scale(
                    input_scale=coarsen.get("input_scale", 1.0),
                    relative_step=coarsen.get("relative_step", DEFAULT_RELATIVE_STEP),
                ),
                noise=(
                    KeyedNoise(noise.get("dist", "gaussian"), noise["scale"])
                    if noise is not None
                    else None
                ),
                reverse_sigmoid=ReverseSigmoid(rs["beta"], rs["gamma"]) if rs is not None else None,
                renormalise=_flag(m, "renormalise", where),
                preserve_top1=_flag(m, "preserve_top1", where),
                top_k=TopK(top_k["k"], top_k.get("mode", "zero")) if top_k is not None else None,
                round=Round(rnd["decimals"]) if rnd is not None else None,
                label_only=_flag(m, "label_only", where),
                watermark_fraction=(
                    check_fraction(wm.get("fraction", DEFAULT_FRACTION)) if wm is not None else None
                ),
                watermark_margin=(
                    _number(wm.get("margin", DEFAULT_SCORE_MARGIN), "watermark.margin")
                    if wm is not None
                    else DEFAULT_SCORE_MARGIN
                ),
                watermark_signal=(
                    check_strength(wm.get("signal", _default_signal(output)), output)
                    if wm is not None
                    else 0.0
                ),
                input_scale=float(coarsen.get("input_scale", 1.0)),
            )
        except ConfigError as exc:
            if exc.message.startswith(where):
                raise
            raise ConfigError(f"{where}: {exc.message}") from exc
        except KeyError as exc:
            raise ConfigError(f"{where}: missing required key {exc.args[0]!r}") from exc

    @classmethod
    def default(cls, output: OutputSpec, *, name: str = "default", **overrides: Any) -> Profile:
        """The default profile (:data:`DEFAULT_PROFILE`) adapted to ``output``.

        ``overrides`` replace top-level keys (e.g. ``coarsen={"input_scale": 16}``).
        """
        mapping = dict(DEFAULT_PROFILE)
        if output.kind is not OutputKind.PROBABILITIES:
            mapping.pop("renormalise")
        mapping.update(overrides)
        return cls.from_mapping(name, mapping, output=output)

    @property
    def keyed(self) -> bool:
        return self.noise is not None or self.watermark_fraction is not None

    def check_output_shape(self, shape: tuple[int, ...]) -> None:
        """Check a model output shape (batch axis first, -1 allowed) against the profile.

        Raises:
            ConfigError: the shape does not fit the profile's output kind.
        """
        if self.output.is_score:
            ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        else:
            ok = len(shape) == 2 and shape[1] == self.output.num_classes
        if not ok:
            raise ConfigError(
                f"defense profile {self.name!r} expects a {self.output.kind.value} output "
                f"with {self.output.num_classes} value(s) per row; the model gives {shape}"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the workload manifest. Holds no secret."""
        steps: list[dict[str, Any]] = []
        if self.watermark_fraction is not None:
            wm: dict[str, Any] = {"step": "watermark", "fraction": self.watermark_fraction}
            if self.output.is_score:
                wm["margin"] = self.watermark_margin
            if self.watermark_signal:
                wm["signal"] = self.watermark_signal
            steps.append(wm)
        if self.noise is not None:
            steps.append(
                {"step": "keyed_noise", "dist": self.noise.dist, "scale": self.noise.scale}
            )
        if self.reverse_sigmoid is not None:
            rs = self.reverse_sigmoid
            steps.append({"step": "reverse_sigmoid", "beta": rs.beta, "gamma": rs.gamma})
        if self.renormalise:
            steps.append({"step": "renormalise"})
        if self.preserve_top1:
            steps.append({"step": "preserve_top1"})
        if self.top_k is not None:
            steps.append({"step": "top_k", "k": self.top_k.k, "mode": self.top_k.mode})
        if self.round is not None:
            steps.append({"step": "round", "decimals": self.round.decimals})
        if self.label_only:
            steps.append({"step": "label_only"})
        return {
            "name": self.name,
            "output": self.output.describe(),
            "coarsen": self.coarsener.describe(),
            "keying": "blake2b-keyed",
            "steps": steps,
        }

    def bind(self, *, key: bytes | None, ledger: WatermarkLedger | None = None) -> BoundProfile:
        """Attach the root secret (from sealed state) and the watermark ledger.

        Raises:
            ConfigError: the profile needs a key (noise, watermark) and ``key`` is
                missing or shorter than 16 bytes, or it watermarks and ``ledger`` is None.
        """
        if self.keyed and (key is None or len(key) < 16):
            raise ConfigError(
                f"defense profile {self.name!r} uses keyed noise or a watermark and needs a "
                "secret key of at least 16 bytes from sealed state"
            )
        if self.watermark_fraction is not None and ledger is None:
            raise ConfigError(
                f"defense profile {self.name!r} watermarks answers and needs a ledger"
            )
        return BoundProfile(self, key=key or b"", ledger=ledger)


def _compact(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``, as float32 when that loses nothing (model inputs and outputs
    usually are float32): half the ledger's size."""
    arr = np.array(a)
    if arr.dtype == np.float64:
        f32 = arr.astype(np.float32)
        if np.array_equal(f32, arr):
            return f32
    return arr


def _default_signal(output: OutputSpec) -> float:
    """The signal watermark is on by default wherever it applies (gentler on scores)."""
    if output.is_score:
        return DEFAULT_SCORE_STRENGTH if output.bounds == (0.0, 1.0) else 0.0
    return DEFAULT_STRENGTH


def _table(m: Mapping[str, Any], key: str, where: str, allowed: set[str]) -> dict[str, Any] | None:
    """The sub-table ``key`` (None when absent or false), with its keys checked."""
    v = m.get(key)
    if v is None or v is False:
        return None
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: {key} must be a table, got {v!r}")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in {key}: {', '.join(unknown)}")
    return dict(v)


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    return float(v)


def _flag(m: Mapping[str, Any], key: str, where: str) -> bool:
    v = m.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v


class BoundProfile:
    """A profile with its secrets, ready for :meth:`apply`. Precomputes everything.

    The hot path calls numpy ufuncs and array methods directly (not the Python-level
    wrappers such as ``np.clip``) because a batch of one is the common case and the
    whole step has a budget of a few tens of microseconds.
    """

    def __init__(self, profile: Profile, *, key: bytes, ledger: WatermarkLedger | None) -> None:
        self.profile = profile
        self._noise_key = derive_key(key, "noise") if profile.noise is not None else b""
        self._noise_table = profile.noise.table() if profile.noise is not None else None
        self._noise_digest = KeyedNoise.digest_size(
            1 if profile.output.is_score else profile.output.num_classes
        )
        self._ledger = ledger
        signal_on = profile.watermark_fraction is not None and profile.watermark_signal > 0
        self._watermark = (
            Watermark(
                key=derive_key(key, "watermark"),
                fraction=profile.watermark_fraction,
                output=profile.output,
                margin=profile.watermark_margin,
                probe_fraction=DEFAULT_PROBE_FRACTION if signal_on else 0.0,
            )
            if profile.watermark_fraction is not None
            else None
        )
        self._signal = (
            Signal(
                key=derive_key(key, "signal"),
                strength=profile.watermark_signal,
                input_scale=profile.input_scale,
                output=profile.output,
            )
            if signal_on
            else None
        )
        self._signal_models: set[str] = set()
        out = profile.output
        self._unit = profile.round.unit if profile.round is not None else 0.0
        self._decimals = profile.round.decimals if profile.round is not None else None
        self._scale = np.array(10.0**self._decimals) if self._decimals is not None else None
        self._ones = np.ones((max(profile.output.num_classes, 1), 1))
        self._score = out.is_score
        self._prob = out.kind is OutputKind.PROBABILITIES
        self._t = out.threshold
        if self._prob:
            self._lo, self._hi = 0.0, 1.0
        elif out.bounds is not None:
            self._lo, self._hi = out.bounds
        else:
            self._lo, self._hi = -math.inf, math.inf
        self._bounded = math.isfinite(self._lo) or math.isfinite(self._hi)
        # 0-d arrays: ufuncs take them about twice as fast as Python floats.
        self._lo_a, self._hi_a = np.array(self._lo), np.array(self._hi)
        self._width = 1 if out.is_score else out.num_classes
        self._need_cells = profile.noise is not None or self._watermark is not None

    def describe(self) -> dict[str, Any]:
        return self.profile.describe()

    def apply(
        self, outputs: np.ndarray, *, inputs: np.ndarray, account: str, model: str
    ) -> Release:
        """:meth:`apply_at_time` at the current time."""
        return self.apply_at_time(
            outputs, inputs=inputs, account=account, model=model, now=time.time()
        )

    def apply_at_time(
        self, outputs: np.ndarray, *, inputs: np.ndarray, account: str, model: str, now: float
    ) -> Release:
        """Perturb and watermark one batch of model outputs; record marks in the ledger.

        ``inputs`` are the model inputs of the same batch (one row per output row;
        for a model with several input tensors, pass them flattened and concatenated
        per row). They key the noise and the watermark through the coarsener.

        Raises:
            ConfigError: the outputs do not have the shape the profile was built for,
                or the batch sizes of inputs and outputs differ.
        """
        p = self.profile
        raw = np.asarray(outputs)
        shape = raw.shape
        if self._score:
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                p.check_output_shape(shape)
        elif len(shape) != 2 or shape[1] != self._width:
            p.check_output_shape(shape)
        x = raw.astype(np.float64)  # always a copy: never write into the engine's buffer
        if self._score:
            x = x.reshape(-1)
        n = shape[0]
        if len(inputs) != n:
            raise ConfigError(f"batch mismatch: {len(inputs)} inputs but {n} outputs")
        if n == 0:  # nothing to answer: nothing to perturb, mark or record
            return self._empty(x.reshape(shape))
        cells = p.coarsener.row_bytes(inputs) if self._need_cells else []
        marks: Marks | None = None
        if self._watermark is not None:
            marks, probes = self._watermark.apply(x, model, cells)
            if probes and self._ledger is not None:
                self._record_probes(x, probes, inputs, account, model)
        # Rows whose top-1 must come out as it goes in: all of them (preserve_top1) or
        # the marked ones (a watermark answer must keep its alternative label).
        enforce: np.ndarray | None = None
        if p.preserve_top1:
            enforce = _ALL
        elif marks is not None:
            enforce = marks.selected
        target: np.ndarray | None = None
        if enforce is not None:
            target = (x > self._t) if self._score else x.argmax(axis=1)
        if self._signal is not None:
            x = self._signal.apply(x, inputs, model, normalise=not p.renormalise)
            if model not in self._signal_models and self._ledger is not None:
                self._ledger.set_signal(self._signal.spec(model))
                self._signal_models.add(model)
        if p.noise is not None:
            prefix = (
                len(account).to_bytes(4, "big")
                + account.encode()
                + len(model).to_bytes(4, "big")
                + model.encode()
            )
            key, size, table = self._noise_key, self._noise_digest, self._noise_table
            assert table is not None
            if n == 1 and size >= 2 * self._width:  # one digest, its bytes are the indices
                d = blake2b(prefix + cells[0], key=key, digest_size=size).digest()
                x += table[np.frombuffer(d, dtype="<u2", count=self._width)]
            else:
                digests = [blake2b(prefix + c, key=key, digest_size=size).digest() for c in cells]
                x += p.noise.sample(digests, self._width, table).reshape(x.shape)
            if self._bounded and not p.renormalise:  # renormalise clips below itself
                self._clip(x)
        if p.reverse_sigmoid is not None:
            if self._score:
                x = p.reverse_sigmoid(np.stack([1.0 - x, x], axis=1))[:, 1]
            else:
                x = p.reverse_sigmoid(x)
        if p.renormalise:
            np.maximum(x, _ZERO, out=x)
            total = x.dot(self._ones)  # (n, 1); a matrix product is the cheapest row sum
            if (total.item() if n == 1 else total.min()) > 0:
                x /= total
            else:
                x = np.divide(x, total, out=np.full_like(x, 1.0 / self._width), where=total > 0)
        if target is not None and enforce is not None and p.top_k is not None:
            # Before top-k, so that the top-1 is among the k kept values.
            self._enforce(x, target, enforce, 0.0)
        indices = None
        form: Literal["full", "top_k", "label"] = "full"
        if p.top_k is not None and p.top_k.k < self._width:
            order = np.argsort(-x, axis=1, kind="stable")[:, : p.top_k.k]
            if p.top_k.mode == "omit":
                x = np.take_along_axis(x, order, axis=1)
                indices, form = order, "top_k"
            else:
                kept = np.zeros_like(x)
                np.put_along_axis(kept, order, np.take_along_axis(x, order, axis=1), axis=1)
                x = kept
        if self._scale is not None:
            # What ndarray.round does (scale, round half to even, unscale), in three
            # ufunc calls on 0-d operands, which is faster for a batch of one.
            np.multiply(x, self._scale, out=x)
            np.rint(x, out=x)
            np.divide(x, self._scale, out=x)
        if target is not None and enforce is not None and indices is None:
            # Swapping commutes with rounding, so one check at the end suffices; ties
            # that rounding created are broken by one rounding unit.
            self._enforce(x, target, enforce, self._unit)
        values: np.ndarray
        if p.label_only:
            form = "label"
            values = (x > self._t).astype(np.int64) if self._score else x.argmax(axis=1)
        elif self._score:
            values = x.reshape(shape)
        else:
            values = x
        if marks is None:
            return Release(
                values=values, marked=np.zeros(n, dtype=bool), form=form, indices=indices
            )
        if self._ledger is not None:
            self._record(marks, values, indices, inputs, cells, account, model, now)
        return Release(values=values, marked=marks.selected, form=form, indices=indices)

    def _empty(self, x: np.ndarray) -> Release:
        """The release of a batch of no rows, in the form the profile gives."""
        none = np.zeros(0, dtype=bool)
        p = self.profile
        if p.label_only:
            return Release(values=np.zeros(0, dtype=np.int64), marked=none, form="label")
        if p.top_k is not None and p.top_k.mode == "omit" and p.top_k.k < self._width:
            k = p.top_k.k
            return Release(values=np.zeros((0, k)), marked=none, form="top_k",
                           indices=np.zeros((0, k), dtype=np.int64))  # fmt: skip
        return Release(values=x, marked=none)

    def _clip(self, x: np.ndarray) -> None:
        np.minimum(x, self._hi_a, out=x)
        np.maximum(x, self._lo_a, out=x)

    def _enforce(self, x: np.ndarray, target: np.ndarray, rows: np.ndarray, unit: float) -> None:
        """Make ``target`` the top-1 (or the threshold side) of the given rows, in place."""
        if self._score:
            t = self._t
            wrong = (x > t) != target
            if rows is not _ALL:
                wrong &= rows
            if not wrong.any():
                return
            bad = np.flatnonzero(wrong)
            x[bad] = 2 * t - x[bad]
            if self._bounded:
                self._clip(x)
            still = bad[(x[bad] > t) != target[bad]]
            # Reflection landed on t itself (or a bound clipped it): step just across.
            step = max(unit, 1e-9)
            x[still] = np.where(target[still], t + step, t - step)
            return
        if len(x) == 1 and rows is _ALL:  # a batch of one: scalar indexing is cheaper
            am1, t1 = int(x.argmax()), int(target[0])
            if am1 == t1:
                return  # the common case, in one call
            row = x[0]
            row[am1], row[t1] = row[t1], row[am1]
            if int(row.argmax()) == t1:
                return
        am = x.argmax(axis=1)
        wrong = am != target
        if rows is not _ALL:
            wrong &= rows
        if not wrong.any():
            return
        bad = np.flatnonzero(wrong)
        tb, ab = target[bad], am[bad]
        hi = x[bad, ab]
        x[bad, ab] = x[bad, tb]
        x[bad, tb] = hi
        # A tie with a lower index still wins argmax: lower the tied competitors by one
        # unit (staying in range), or lift the top-1 when they cannot go lower.
        for r in bad[x[bad].argmax(axis=1) != target[bad]]:
            t = target[r]
            m = x[r, t]
            lower = m - unit if unit > 0 else np.nextafter(m, -np.inf)
            ties = x[r] >= m
            ties[t] = False
            if lower >= self._lo:
                x[r, ties] = lower
            else:
                x[r, t] = m + unit if unit > 0 else np.nextafter(m, np.inf)

    def _record_probes(
        self,
        x: np.ndarray,
        probes: list[tuple[int, str]],
        inputs: np.ndarray,
        account: str,
        model: str,
    ) -> None:
        """Offer the probe candidates (rows of the original answers ``x``) to the
        ledger; the margin is checked first so that a full ledger costs little."""
        ledger = self._ledger
        assert ledger is not None
        t = self._t
        for r, cell in probes:
            row = x[r]
            if self._score:
                v = float(row)
                label, margin = int(v > t), abs(v - t)
            else:
                vals = row.tolist()
                top2 = sorted(vals)[-2:]
                label, margin = vals.index(top2[1]), top2[1] - top2[0]
            if not ledger.wants_probe(account, model, margin, cell):
                continue
            ledger.add_probes(
                [
                    ProbeEntry(
                        account=account,
                        model=model,
                        input=_compact(inputs[r]),
                        label=label,
                        margin=margin,
                        cell=cell,
                        output=_compact(row).reshape(-1),
                    )
                ]
            )

    def _record(
        self,
        marks: Marks,
        values: np.ndarray,
        indices: np.ndarray | None,
        inputs: np.ndarray,
        cells: list[bytes],
        account: str,
        model: str,
        now: float,
    ) -> None:
        assert self._ledger is not None
        inp = np.asarray(inputs)
        kind = "score" if self._score else "class"
        entries = []
        for r in np.flatnonzero(marks.selected):
            answer = np.asarray(values[r], dtype=np.float64).reshape(-1)
            if indices is not None:
                answer = np.stack([indices[r].astype(np.float64), answer])
            entries.append(
                LedgerEntry(
                    account=account,
                    time=now,
                    model=model,
                    input=inp[r].copy(),
                    answer=answer,
                    label=int(marks.labels[r]),
                    original=int(marks.original[r]),
                    prior=float(marks.prior[r]),
                    kind=kind,
                    threshold=self._t,
                    cell=hashlib.sha256(cells[r]).hexdigest()[:32],
                )
            )
        self._ledger.extend(entries)
