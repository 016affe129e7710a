"""Watermarking answers in the manner of DAWN (Szyller et al., 2021) and its ledger.

A keyed function (keyed BLAKE2b, a PRF) of the model name and the *coarsened* input
(:mod:`sealserve.defense.release.coarsen`) selects a configured fraction of queries. For a
selected query the answer is a deterministic alternative:

* classifier (probabilities or logits): another label, chosen by the same keyed hash
  among the labels that are not the true top-1, becomes the top-1 by *swapping* its
  value with the top-1's value. The answer keeps the original's confidence and the same
  multiset of values, so it looks like any other answer (it still sums to 1);
* score: the score is reflected across the decision threshold, at least ``margin``
  away from it, so the decision flips deterministically.

Selection and the alternative depend on the model and the input only, not on the
account: colluding accounts that compare answers see no disagreement that would reveal
which queries carry the mark. Repeating (or jittering within the cell) a watermarked
query returns the same alternative. Each marked answer is recorded in the sealed
:class:`~sealserve.defense.watermark.ledger.WatermarkLedger` (by
:mod:`sealserve.defense.watermark.recorder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np

from sealserve.defense.outputs import OutputKind, OutputSpec
from sealserve.errors import ConfigError

__all__ = ["DEFAULT_FRACTION", "DEFAULT_SCORE_MARGIN", "Marks", "Watermark"]

DEFAULT_FRACTION = 0.002
"""Share of queries marked. Honest top-1 agreement is 1 - fraction in expectation
(99.8%), leaving room under the 99.5% target for the sampling spread of a few hundred
test inputs (on 450 inputs, about 94% of keys stay >= 99.5%); DAWN uses about 0.5%."""

DEFAULT_SCORE_MARGIN = 0.1
MAX_FRACTION = 0.2


_TWO64 = float(2**64)


@dataclass(frozen=True)
class Marks:
    """Which rows of a batch are marked, their watermark label and the original top-1.

    ``labels`` and ``original`` are -1 on unmarked rows; ``prior`` is the original
    model's probability of the watermark label (NaN where not known).
    """

    selected: np.ndarray
    labels: np.ndarray
    original: np.ndarray
    prior: np.ndarray


class Watermark:
    """Selects a keyed fraction of inputs and rewrites their answers.

    Args:
        key: the watermark secret (>= 16 bytes); derive it, never reuse the raw root key.
        fraction: share of inputs to mark, in (0, 0.2].
        output: the model output the answers have.
        margin: for scores, the least distance of the shifted score from the threshold.

    Raises:
        ConfigError: a parameter is out of range.
    """

    def __init__(
        self,
        *,
        key: bytes,
        fraction: float = DEFAULT_FRACTION,
        output: OutputSpec,
        margin: float = DEFAULT_SCORE_MARGIN,
        probe_fraction: float = 0.0,
    ) -> None:
        check_fraction(fraction)
        if not 0.0 <= probe_fraction <= 1.0:
            raise ConfigError(f"probe fraction must be in [0, 1], got {probe_fraction!r}")
        if len(key) < 16:
            raise ConfigError("the watermark key must be at least 16 bytes")
        check_margin(margin, output)
        self._key = key
        self._cut = int(fraction * _TWO64)
        self._probe_cut = int(probe_fraction * _TWO64)
        self._classes_minus_1 = max(output.num_classes - 1, 1)
        self.fraction = fraction
        self.output = output
        self.margin = float(margin)

    def select(
        self, model: str, cells: Sequence[bytes]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
        """The marked rows, each with a keyed label offset in [1, classes - 1], and
        the rows picked as boundary-probe candidates (independent keyed bits), each
        with an identifier of its cell (more keyed bits, hex)."""
        prefix = len(model).to_bytes(4, "big") + model.encode()
        c = self._classes_minus_1
        cut, probe_cut, key = self._cut, self._probe_cut, self._key
        out = []
        probes = []
        for i, cell in enumerate(cells):
            d = blake2b(prefix + cell, key=key, digest_size=40).digest()
            if int.from_bytes(d[:8], "big") < cut:
                out.append((i, int.from_bytes(d[8:16], "big") % c + 1))
            elif int.from_bytes(d[16:24], "big") < probe_cut:
                probes.append((i, d[24:40].hex()))
        return out, probes

    def apply(
        self, values: np.ndarray, model: str, cells: Sequence[bytes]
    ) -> tuple[Marks | None, list[tuple[int, str]]]:
        """Rewrite the selected rows of ``values`` in place; return what was marked
        (None when no row is) and the probe candidates (row, cell id); the candidates'
        rows are left as they were. ``values`` is float64, (batch, classes) or (batch,)."""
        chosen, probes = self.select(model, cells)
        if not chosen:
            return None, probes
        return self._mark(values, chosen), probes

    def _mark(self, values: np.ndarray, chosen: list[tuple[int, int]]) -> Marks:
        n = len(values)
        selected = np.zeros(n, dtype=bool)
        labels = np.full(n, -1, dtype=np.int64)
        original = np.full(n, -1, dtype=np.int64)
        prior = np.full(n, np.nan)
        rows = np.array([r for r, _ in chosen], dtype=np.int64)
        offsets = np.array([o for _, o in chosen], dtype=np.int64)
        selected[rows] = True
        if self.output.is_score:
            t = self.output.threshold
            s = values[rows]
            above = s > t
            dist = np.maximum(np.abs(s - t), self.margin)
            shifted = np.where(above, t - dist, t + dist)
            if self.output.bounds is not None:
                lo, hi = self.output.bounds
                # Keep the flipped decision: clip to the bound on the far side.
                shifted = np.where(above, np.maximum(shifted, lo), np.minimum(shifted, hi))
            values[rows] = shifted
            original[rows] = above.astype(np.int64)
            labels[rows] = 1 - original[rows]
            if self.output.bounds == (0.0, 1.0):
                prior[rows] = np.where(above, 1.0 - s, s)
            return Marks(selected, labels, original, prior)
        top1 = values[rows].argmax(axis=1)
        alt = (top1 + offsets) % self.output.num_classes
        v_top = values[rows, top1]
        v_alt = values[rows, alt]
        values[rows, top1] = v_alt
        values[rows, alt] = v_top
        original[rows] = top1
        labels[rows] = alt
        if self.output.kind is OutputKind.PROBABILITIES:
            prior[rows] = v_alt
        return Marks(selected, labels, original, prior)

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {
            "fraction": self.fraction,
            "selection": "blake2b-keyed(model, cell)",
        }
        if self.output.is_score:
            d["margin"] = self.margin
        return d


def check_margin(margin: float, output: OutputSpec) -> None:
    """For score outputs, check the watermark shift margin fits inside the bounds.

    Raises:
        ConfigError: the margin is not > 0 or does not fit.
    """
    if not output.is_score:
        return
    if not (math.isfinite(margin) and margin > 0):
        raise ConfigError(f"watermark.margin must be a number > 0, got {margin!r}")
    if output.bounds is not None:
        lo, hi = output.bounds
        room = min(output.threshold - lo, hi - output.threshold)
        if margin >= room:
            raise ConfigError(
                f"watermark.margin {margin} does not fit between the threshold "
                f"{output.threshold} and the score bounds [{lo}, {hi}]"
            )


def check_fraction(fraction: object) -> float:
    """Return ``fraction`` as a float if it lies in (0, 0.2]; else raise ConfigError."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not (0.0 < fraction <= MAX_FRACTION)
    ):
        raise ConfigError(
            f"watermark.fraction must be in (0, {MAX_FRACTION}], got {fraction!r} "
            f"(DAWN uses about 0.005)"
        )
    return float(fraction)
