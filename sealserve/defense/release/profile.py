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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sealserve.defense.outputs import OutputKind, OutputSpec
from sealserve.defense.release.coarsen import DEFAULT_RELATIVE_STEP, Coarsener
from sealserve.defense.release.hot_path import BoundProfile
from sealserve.defense.release.transforms import KeyedNoise, ReverseSigmoid, Round, TopK
from sealserve.defense.watermark.band import (
    DEFAULT_BAND_MARGIN,
    DEFAULT_BAND_RATE,
    check_band,
)
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.marks import (
    DEFAULT_FRACTION,
    DEFAULT_SCORE_MARGIN,
    check_fraction,
    check_margin,
)
from sealserve.defense.watermark.signal import (
    DEFAULT_SCORE_STRENGTH,
    DEFAULT_STRENGTH,
    check_strength,
)
from sealserve.errors import ConfigError

__all__ = ["DEFAULT_PROFILE", "Profile"]

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
    watermark_band: tuple[float, float] | None = None
    """Band marks (margin, rate) (:mod:`sealserve.defense.watermark.band`), or None."""
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
        if self.watermark_band is not None:
            if self.watermark_fraction is None:
                raise ConfigError(f"{where}: watermark band is set without a watermark")
            if kind is not OutputKind.PROBABILITIES:
                raise ConfigError(
                    f"{where}: watermark.band needs probability outputs (its margin is a "
                    f"top1 - top2 probability margin); this model gives {kind.value}"
                )
            check_band(*self.watermark_band)

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
                {"fraction", "margin", "signal", "band"},
            )
            band = _band(wm, where) if wm is not None else None
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
                watermark_band=band,
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
            if self.watermark_band is not None:
                wm["band"] = {"margin": self.watermark_band[0], "rate": self.watermark_band[1]}
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


def _band(wm: Mapping[str, Any], where: str) -> tuple[float, float] | None:
    """The ``band`` sub-table of ``watermark`` (None when absent or false)."""
    v = wm.get("band")
    if v is None or v is False:
        return None
    t = _table({"band": {} if v is True else v}, "band", where, {"margin", "rate"})
    assert t is not None
    return check_band(t.get("margin", DEFAULT_BAND_MARGIN), t.get("rate", DEFAULT_BAND_RATE))


def _number(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    return float(v)


def _flag(m: Mapping[str, Any], key: str, where: str) -> bool:
    v = m.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v
