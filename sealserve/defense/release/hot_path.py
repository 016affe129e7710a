"""The release hot path: a profile bound to its secrets, applied to every batch.

:class:`BoundProfile` runs the transforms of :mod:`.transforms` in the fixed order
described in :mod:`.profile`, hands the marked rows to the watermark room's
:class:`~sealserve.defense.watermark.recorder.LedgerRecorder`, and returns a
:class:`Release` for the guard to encode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sealserve.defense.outputs import OutputKind
from sealserve.defense.release.transforms import KeyedNoise, derive_key
from sealserve.defense.watermark.band import BandMark
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.marks import Marks, Watermark
from sealserve.defense.watermark.recorder import LedgerRecorder
from sealserve.defense.watermark.signal import DEFAULT_PROBE_FRACTION, Signal
from sealserve.errors import ConfigError

if TYPE_CHECKING:  # a type only: profile.py builds BoundProfile, never the reverse
    from sealserve.defense.release.profile import Profile

_ZERO = np.array(0.0)
_ALL = np.ones(0, dtype=bool)  # sentinel: "every row" (compared by identity)


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
    band: np.ndarray | None = None
    """Rows whose label the band marks turned into the runner-up (None: none)."""
    band_rows: int = 0
    """Rows of the batch in the band (offered to the ledger whether flipped or not)."""


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
        out = profile.output
        self._ledger = ledger
        self._recorder = (
            LedgerRecorder(ledger, score=out.is_score, threshold=out.threshold)
            if ledger is not None
            else None
        )
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
        self._band = (
            BandMark(
                key=derive_key(key, "band"),
                margin=profile.watermark_band[0],
                rate=profile.watermark_band[1],
            )
            if profile.watermark_band is not None
            else None
        )
        self._band_models: set[str] = set()
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
        band = None
        if self._band is not None:  # on the ORIGINAL answer, before anything moves it
            band = self._band.select(x, model, cells)
            if len(band[0]):
                self._record_band(band, inputs, cells, account, model)
        if self._watermark is not None:
            marks, probes = self._watermark.apply(x, model, cells)
            if probes and self._recorder is not None:
                self._recorder.record_probes(x, probes, inputs, account, model)
        flipped: np.ndarray | None = None
        new_top: np.ndarray | None = None
        if band is not None and band[3].any():
            new_top = self._flip(x, band, marks)
            flipped = new_top >= 0 if new_top is not None else None
        # Rows whose top-1 must come out as it goes in: all of them (preserve_top1) or
        # the marked ones (a watermark answer must keep its alternative label).
        enforce: np.ndarray | None = None
        if p.preserve_top1:
            enforce = _ALL
        elif marks is not None:
            enforce = marks.selected if flipped is None else marks.selected | flipped
        elif flipped is not None:
            enforce = flipped
        target: np.ndarray | None = None
        if enforce is not None:
            target = (x > self._t) if self._score else x.argmax(axis=1)
            if new_top is not None and flipped is not None:  # a tie must not undo a flip
                target[flipped] = new_top[flipped]
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
                values=values, marked=np.zeros(n, dtype=bool), form=form, indices=indices,
                band=flipped, band_rows=len(band[0]) if band is not None else 0,
            )  # fmt: skip
        if self._recorder is not None:
            self._recorder.record(marks, values, indices, inputs, cells, account, model, now)
        return Release(
            values=values, marked=marks.selected, form=form, indices=indices, band=flipped,
            band_rows=len(band[0]) if band is not None else 0,
        )  # fmt: skip

    def _record_band(
        self,
        band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        inputs: np.ndarray,
        cells: list[bytes],
        account: str,
        model: str,
    ) -> None:
        if self._recorder is None or self._ledger is None:
            return
        assert self._band is not None
        if model not in self._band_models:
            self._ledger.set_band(self._band.spec(model))
            self._band_models.add(model)
        rows, t1, t2, _ = band
        self._recorder.record_band(rows, t1, t2, inputs, cells, account, model)

    def _flip(
        self,
        x: np.ndarray,
        band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        marks: Marks | None,
    ) -> np.ndarray | None:
        """Swap the top-1 and top-2 values of the coin-marked band rows of ``x`` (in
        place; rows carrying a DAWN mark are left alone). Returns the new top-1 of each
        row (-1 where unchanged), or None when no row flips."""
        rows, t1, t2, flags = band
        rows, t1, t2 = rows[flags], t1[flags], t2[flags]
        if marks is not None:
            free = ~marks.selected[rows]
            rows, t1, t2 = rows[free], t1[free], t2[free]
        if len(rows) == 0:
            return None
        hi = x[rows, t1]
        x[rows, t1] = x[rows, t2]
        x[rows, t2] = hi
        out = np.full(len(x), -1, dtype=np.int64)
        out[rows] = t2
        return out

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
