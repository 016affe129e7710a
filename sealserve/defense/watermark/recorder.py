"""Record what the hot path released into the watermark ledger.

The release hot path (:class:`sealserve.defense.release.hot_path.BoundProfile`) hands
over the marked rows and the probe candidates of each batch; this module turns them
into ledger entries (compact copies of the inputs and answers) so that the ledger's
format is decided in the watermark room alone.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sealserve.defense.watermark.band import BandEntry
from sealserve.defense.watermark.ledger import LedgerEntry, ProbeEntry, WatermarkLedger
from sealserve.defense.watermark.marks import Marks


def _compact(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``, as float32 when that loses nothing (model inputs and outputs
    usually are float32): half the ledger's size."""
    arr = np.array(a)
    if arr.dtype == np.float64:
        f32 = arr.astype(np.float32)
        if np.array_equal(f32, arr):
            return f32
    return arr


class LedgerRecorder:
    """Writes one bound profile's marks and probes into its ledger."""

    def __init__(self, ledger: WatermarkLedger, *, score: bool, threshold: float) -> None:
        self._ledger = ledger
        self._score = score
        self._t = threshold

    def record_probes(
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

    def record_band(
        self,
        rows: np.ndarray,
        top1: np.ndarray,
        top2: np.ndarray,
        inputs: np.ndarray,
        cells: list[bytes],
        account: str,
        model: str,
    ) -> None:
        """Offer the band rows (original top-1/top-2; not the flip) to the ledger."""
        if not self._ledger.wants_band(account, model):
            return
        inp = np.asarray(inputs)
        self._ledger.add_band(
            BandEntry(
                account=account,
                model=model,
                input=_compact(inp[r]).reshape(inp[r].shape),
                cell=cells[r],
                top1=int(a),
                top2=int(b),
            )
            for r, a, b in zip(rows.tolist(), top1.tolist(), top2.tolist(), strict=True)
        )

    def record(
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
