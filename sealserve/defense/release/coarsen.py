"""Coarsening of model inputs before they key noise and watermark selection.

Keyed noise and the watermark are functions of the *coarsened* input, never of its
exact bytes: otherwise an attacker could add 1e-9 to one feature and get a fresh
noise sample (and average many of them away), or step around a watermark.

The coarsening is a per-feature grid. With ``step = input_scale * relative_step``
each feature value ``x`` maps to the integer cell ``rint(x / step)`` (nearest
integer), so the grid is *centred* on multiples of ``step``: a value that sits on a grid
point is ``step / 2`` away from the nearest boundary. For the demo digits features
(integers in [0, 16], ``input_scale = 16``) the default ``relative_step = 1/16`` gives
``step = 1``: every natural input lies at a cell centre and any jitter below 0.5 per
feature (including +-1e-4 relative, at most 0.0016) keeps the cell.

Trade-off: a value near a cell boundary (``(k + 1/2) * step``) changes cell under a
small jitter and then gets fresh noise. That costs the attacker one query per sample
(quota and detection see it) and the sample is for a genuinely different input. A
coarser grid buys more jitter tolerance but makes more distinct inputs share one noise
sample and one watermark decision.

Why not a random-projection sign sketch (``sign(W x)``, LSH)? Its cells are unbounded
cones: inputs far apart (``x`` and ``3 x``) share a cell, and any input near one of the
hyperplanes flips a bit under tiny jitter, so it is no more jitter-proof than the grid,
costs a matrix product per request, and gives no control over cell size in input units.
The grid is one vectorised division and a rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sealserve.errors import ConfigError

__all__ = ["DEFAULT_RELATIVE_STEP", "Coarsener"]

DEFAULT_RELATIVE_STEP = 1.0 / 16.0

# Cells beyond this magnitude are clamped so the int64 cast is always defined
# (huge or non-finite inputs all land in the outermost cell).
_CELL_LIMIT = float(2**53)
_SAFE_SUM_SQUARES = 1e30  # every |cell| < 1e15 < 2**53 when the sum of squares is below
_SMALL_SUM_SQUARES = 32767.0**2  # every |cell| <= 32767 (fits int16) when below


@dataclass(frozen=True)
class Coarsener:
    """A per-feature grid of absolute cell size ``step`` (in input units).

    Build it with :meth:`from_scale` from the feature scale; ``step`` must be a finite
    positive number, else :class:`~sealserve.errors.ConfigError`.
    """

    step: float
    _inv: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step) and self.step > 0):
            raise ConfigError(f"coarsening step must be a finite number > 0, got {self.step!r}")
        # A 0-d array: ufuncs take it faster than a Python float.
        object.__setattr__(self, "_inv", np.array(1.0 / self.step))

    @classmethod
    def from_scale(
        cls, *, input_scale: float = 1.0, relative_step: float = DEFAULT_RELATIVE_STEP
    ) -> Coarsener:
        """Grid of step ``input_scale * relative_step``.

        ``input_scale`` is the typical range of one feature (16 for the digits demo,
        1 for inputs normalised to [0, 1], 255 for raw 8-bit pixels).

        Raises:
            ConfigError: either number is not finite and > 0, or ``relative_step > 1``.
        """
        for name, value in (("input_scale", input_scale), ("relative_step", relative_step)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"coarsen.{name} must be a finite number > 0, got {value!r}")
        if relative_step > 1:
            raise ConfigError(
                f"coarsen.relative_step must be <= 1 (a fraction of input_scale), "
                f"got {relative_step!r}"
            )
        return cls(step=float(input_scale) * float(relative_step))

    def cells(self, inputs: np.ndarray) -> np.ndarray:
        """Integer cell indices, shape ``(batch, features)`` (trailing axes flattened)."""
        # One call converts to float64 and scales (no separate astype copy).
        c: np.ndarray = np.multiply(inputs, self._inv, dtype=np.float64)
        c = c.reshape(len(inputs), -1)
        np.rint(c, out=c)
        flat = c.reshape(-1)
        # One reduction tells whether every cell is finite and small (NaN fails the
        # comparison); only then are fmin/fmax needed (they map NaN to the upper limit).
        if not flat.dot(flat) < _SAFE_SUM_SQUARES:
            np.fmin(c, _CELL_LIMIT, out=c)
            np.fmax(c, -_CELL_LIMIT, out=c)
        return c.astype(np.int64)

    def row_bytes(self, inputs: np.ndarray) -> list[bytes]:
        """One canonical byte string per batch row: feature count, cell width, cells.

        Two inputs give the same bytes exactly when they have the same number of
        features and fall in the same cell of every feature. A row whose cells have a
        sum of squares below 32767^2 is written as int16 (width byte 2), any other
        row as int64 (width byte 8): the rule depends on the row alone, so a row's
        bytes do not depend on the batch it came in, and the two sets are disjoint.
        Short messages make the keyed hashes that follow cheaper.
        """
        c: np.ndarray = np.multiply(inputs, self._inv, dtype=np.float64)
        c = c.reshape(len(inputs), -1)
        np.rint(c, out=c)
        n, f = c.shape
        narrow = f.to_bytes(4, "big") + b"\x02"
        if n == 1:
            flat = c.reshape(-1)
            if flat.dot(flat) < _SMALL_SUM_SQUARES:  # NaN fails the comparison
                return [narrow + c.astype("<i2").tobytes()]
            return [self._wide(c, f)]
        small = np.einsum("ij,ij->i", c, c) < _SMALL_SUM_SQUARES
        if small.all():
            raw, w = c.astype("<i2").tobytes(), 2 * f
            return [narrow + raw[i * w : (i + 1) * w] for i in range(n)]
        return [
            narrow + c[i].astype("<i2").tobytes() if small[i] else self._wide(c[i : i + 1], f)
            for i in range(n)
        ]

    @staticmethod
    def _wide(row: np.ndarray, f: int) -> bytes:
        """A row with large or non-finite cells, clamped to +-2^53, as int64."""
        r: np.ndarray = np.fmax(np.fmin(row, _CELL_LIMIT), -_CELL_LIMIT)
        cells: bytes = r.astype("<i8").tobytes()
        return f.to_bytes(4, "big") + b"\x08" + cells

    def describe(self) -> dict[str, object]:
        return {"grid": "centred", "step": self.step}
