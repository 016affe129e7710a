"""The watermark ledger: what was marked, for whom, and the signal probes.

Over 400 lines: one sealed record format (marks and probes), its bounds and its
encoding, which must agree.

Each marked answer is recorded (account, time, model, input, the answer given, the
watermark label) for :mod:`sealserve.defense.watermark.verify` to replay against a
suspect. The ledger holds client inputs, so it is sealed at rest: it is written only
through :meth:`WatermarkLedger.to_bytes` into the enclave's sealed file, and read back
with :meth:`WatermarkLedger.from_sealed`; nothing here writes a plaintext ledger to disk.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sealserve.defense.watermark.band import DEFAULT_MAX_BAND_ROWS, BandEntry, BandSpec
from sealserve.defense.watermark.signal import DEFAULT_MAX_PROBES, SignalSpec
from sealserve.errors import ConfigError, SealedFormatError, SealserveError

__all__ = ["LEDGER_MAGIC", "LEDGER_VERSION", "LedgerEntry", "ProbeEntry", "WatermarkLedger"]

LEDGER_MAGIC = b"SSWMLEDG"
LEDGER_VERSION = 3
"""3 added the band marks (``band`` rows and ``bands`` specs); 1 and 2 still read."""
_READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class LedgerEntry:
    """One marked answer: who asked what, when, what we answered and the mark's label.

    ``kind`` is ``"class"`` (label = class index) or ``"score"`` (label = 1 when the
    answer is above ``threshold``). ``original`` is the unmarked model's label and
    ``prior`` its probability of the watermark label (NaN when not known).
    """

    account: str
    time: float
    model: str
    input: np.ndarray
    answer: np.ndarray
    label: int
    original: int
    prior: float
    kind: str = "class"
    threshold: float = 0.5
    cell: str = ""
    """Digest of the coarsened input: entries with equal ``cell`` share one keyed
    decision, so the verifier counts them once."""


@dataclass(frozen=True)
class ProbeEntry:
    """A query of ``account`` near the model's decision boundary, kept to test the
    signal watermark (:mod:`sealserve.defense.watermark.signal`): the input, the original
    (unperturbed) label and the original top-1/top-2 margin (scores: distance from
    the threshold)."""

    account: str
    model: str
    input: np.ndarray
    label: int
    margin: float
    cell: str
    output: np.ndarray | None = None
    """The original (unperturbed) answer, 1-D: what the signal test compares a
    suspect's probabilities or scores with."""


def _arr_to_json(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {
        "dtype": a.dtype.newbyteorder("<").str if a.dtype.byteorder == "=" else a.dtype.str,
        "shape": list(a.shape),
        "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode(),
    }


def _arr_from_json(d: Any) -> np.ndarray:
    dtype = np.dtype(str(d["dtype"]))
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported array dtype {dtype}")
    raw = base64.b64decode(str(d["b64"]), validate=True)
    shape = tuple(int(x) for x in d["shape"])
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


class WatermarkLedger:
    """The record of every marked answer, of boundary probes and of the signal
    watermark's per-model seeds. Thread-safe.

    Probes are capped at ``max_probes`` per (account, model): when full, a new probe
    replaces the kept one farthest from a decision boundary, so the ledger keeps the
    account's most informative queries in bounded memory. A cell is kept once.

    Band rows (:mod:`sealserve.defense.watermark.band`) are kept first-come, up to
    ``max_band_rows`` distinct cells per (account, model): a cap that does not depend on
    the band key, so the kept window is chosen without the coins.

    Serialised by :meth:`to_bytes` as ``LEDGER_MAGIC`` + version byte + UTF-8 JSON
    (arrays as dtype, shape and base64 little-endian bytes).
    """

    def __init__(
        self,
        entries: Iterable[LedgerEntry] = (),
        *,
        probes: Iterable[ProbeEntry] = (),
        signals: Iterable[SignalSpec] = (),
        max_probes: int = DEFAULT_MAX_PROBES,
        band: Iterable[BandEntry] = (),
        bands: Iterable[BandSpec] = (),
        max_band_rows: int = DEFAULT_MAX_BAND_ROWS,
    ) -> None:
        if max_probes < 0:
            raise ConfigError(f"max_probes must be >= 0, got {max_probes}")
        if max_band_rows < 0:
            raise ConfigError(f"max_band_rows must be >= 0, got {max_band_rows}")
        self._max_band_rows = max_band_rows
        self._band: list[BandEntry] = []
        self._band_cells: dict[tuple[str, str], set[bytes]] = {}
        self._bands: dict[str, BandSpec] = {b.model: b for b in bands}
        self._entries: list[LedgerEntry] = list(entries)
        self._lock = threading.Lock()
        self._max_probes = max_probes
        # (account, model) -> heap of (-margin, seq, probe), and the cells it holds.
        self._probes: dict[tuple[str, str], list[tuple[float, int, ProbeEntry]]] = {}
        self._probe_cells: dict[tuple[str, str], set[str]] = {}
        self._seq = 0
        self._signals: dict[str, SignalSpec] = {s.model: s for s in signals}
        self.add_probes(probes)
        self.add_band(band)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_probes(self) -> int:
        return self._max_probes

    @classmethod
    def union(cls, ledgers: Sequence[WatermarkLedger]) -> WatermarkLedger:
        """One ledger with every entry, probe, band row and per-model spec of ``ledgers``
        (the per-worker ledgers of one server). Caps are the sources' summed, so the
        union drops nothing a source kept."""
        out = cls(
            max_probes=sum(led._max_probes for led in ledgers),
            max_band_rows=sum(led._max_band_rows for led in ledgers),
        )
        for led in ledgers:
            out.extend(led.entries())
            out.add_probes(led.probes())
            out.add_band(led.band_rows())
            for band in led._band_list():
                out.set_band(band)
            for signal in led._signal_list():
                out.set_signal(signal)
        return out

    def append(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def extend(self, entries: Iterable[LedgerEntry]) -> None:
        with self._lock:
            self._entries.extend(entries)

    def entries(self, *, account: str | None = None, model: str | None = None) -> list[LedgerEntry]:
        """A snapshot of the entries, optionally only one account's and/or one model's."""
        with self._lock:
            snap = list(self._entries)
        return [
            e
            for e in snap
            if (account is None or e.account == account) and (model is None or e.model == model)
        ]

    def accounts(self) -> list[str]:
        with self._lock:
            probe_accounts = {a for a, _ in self._probes}
        return sorted({e.account for e in self.entries()} | probe_accounts)

    def add_probes(self, probes: Iterable[ProbeEntry]) -> None:
        """Keep each probe if its (account, model) has room or it is nearer a boundary
        than the farthest kept one."""
        cap = self._max_probes
        with self._lock:
            for pr in probes:
                key = (pr.account, pr.model)
                heap = self._probes.setdefault(key, [])
                cells = self._probe_cells.setdefault(key, set())
                if pr.cell in cells or cap == 0:
                    continue
                self._seq += 1
                item = (-pr.margin, self._seq, pr)
                if len(heap) < cap:
                    heapq.heappush(heap, item)
                elif pr.margin < -heap[0][0]:
                    cells.discard(heapq.heapreplace(heap, item)[2].cell)
                else:
                    continue
                cells.add(pr.cell)

    def set_max_probes(self, max_probes: int) -> None:
        """Change the cap, dropping the probes farthest from a boundary beyond it."""
        if max_probes < 0:
            raise ConfigError(f"max_probes must be >= 0, got {max_probes}")
        with self._lock:
            self._max_probes = max_probes
            for key, heap in self._probes.items():
                while len(heap) > max_probes:
                    self._probe_cells[key].discard(heapq.heappop(heap)[2].cell)

    def wants_probe(self, account: str, model: str, margin: float, cell: str) -> bool:
        """Would a probe of this margin and cell be kept? (A cheap check before
        building it; :meth:`add_probes` decides under the lock.)"""
        key = (account, model)
        heap = self._probes.get(key)
        if heap is None:
            return self._max_probes > 0
        if cell in self._probe_cells[key]:
            return False
        return len(heap) < self._max_probes or margin < -heap[0][0]

    def probes(self, *, account: str | None = None, model: str | None = None) -> list[ProbeEntry]:
        """The kept probes (optionally one account's / one model's), nearest first."""
        with self._lock:
            snap = [
                item[2]
                for (a, m), heap in self._probes.items()
                if (account is None or a == account) and (model is None or m == model)
                for item in heap
            ]
        return sorted(snap, key=lambda p: p.margin)

    def wants_band(self, account: str, model: str) -> bool:
        """Is there room for another band row of (account, model)? (A cheap check.)"""
        cells = self._band_cells.get((account, model))
        return cells is None or len(cells) < self._max_band_rows

    def add_band(self, rows: Iterable[BandEntry]) -> None:
        """Keep each band row whose cell is new for its (account, model), first-come,
        up to ``max_band_rows`` (a cap that never reads the band key)."""
        cap = self._max_band_rows
        with self._lock:
            for r in rows:
                cells = self._band_cells.setdefault((r.account, r.model), set())
                if r.cell in cells or len(cells) >= cap:
                    continue
                cells.add(r.cell)
                self._band.append(r)

    def band_rows(self, *, account: str | None = None, model: str | None = None) -> list[BandEntry]:
        """The recorded band rows in arrival order (optionally one account's / model's)."""
        with self._lock:
            snap = list(self._band)
        return [
            r
            for r in snap
            if (account is None or r.account == account) and (model is None or r.model == model)
        ]

    def set_band(self, spec: BandSpec) -> None:
        """Record the band marks of ``spec.model`` (first one wins)."""
        with self._lock:
            self._bands.setdefault(spec.model, spec)

    def band(self, model: str) -> BandSpec | None:
        with self._lock:
            return self._bands.get(model)

    def set_signal(self, spec: SignalSpec) -> None:
        """Record the signal watermark of ``spec.model`` (first one wins: a model's
        seed never changes while its key does not)."""
        with self._lock:
            self._signals.setdefault(spec.model, spec)

    def signal(self, model: str) -> SignalSpec | None:
        with self._lock:
            return self._signals.get(model)

    def _band_list(self) -> list[BandSpec]:
        with self._lock:
            return list(self._bands.values())

    def _signal_list(self) -> list[SignalSpec]:
        with self._lock:
            return list(self._signals.values())

    # -- serialisation -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Plaintext serialisation; seal it before it leaves memory (see :meth:`save`)."""
        body = {
            "entries": [
                {
                    "account": e.account,
                    "time": e.time,
                    "model": e.model,
                    "input": _arr_to_json(e.input),
                    "answer": _arr_to_json(e.answer),
                    "label": e.label,
                    "original": e.original,
                    "prior": None if math.isnan(e.prior) else e.prior,
                    "kind": e.kind,
                    "threshold": e.threshold,
                    "cell": e.cell,
                }
                for e in self.entries()
            ],
            "probes": [
                {
                    "account": p.account,
                    "model": p.model,
                    "input": _arr_to_json(p.input),
                    "label": p.label,
                    "margin": p.margin,
                    "cell": p.cell,
                    "output": None if p.output is None else _arr_to_json(p.output),
                }
                for p in self.probes()
            ],
            "signals": [
                {
                    "model": g.model,
                    "seed": g.seed.hex(),
                    "strength": g.strength,
                    "input_scale": g.input_scale,
                    "classes": g.classes,
                    "threshold": g.threshold,
                    "kind": g.kind,
                }
                for g in sorted(self._signal_list(), key=lambda g: g.model)
            ],
            "max_probes": self._max_probes,
            "band": [
                {
                    "account": r.account,
                    "model": r.model,
                    "input": _arr_to_json(r.input),
                    "cell": r.cell.hex(),
                    "top1": r.top1,
                    "top2": r.top2,
                }
                for r in self.band_rows()
            ],
            "bands": [
                {"model": b.model, "key": b.key.hex(), "margin": b.margin, "rate": b.rate}
                for b in sorted(self._band_list(), key=lambda b: b.model)
            ],
            "max_band_rows": self._max_band_rows,
        }
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return LEDGER_MAGIC + bytes([LEDGER_VERSION]) + text.encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WatermarkLedger:
        """Parse :meth:`to_bytes` output.

        Raises:
            SealedFormatError: wrong magic, unknown version, or a malformed body.
        """
        if not data.startswith(LEDGER_MAGIC):
            raise SealedFormatError("not a sealserve watermark ledger (bad magic)")
        if len(data) <= len(LEDGER_MAGIC):
            raise SealedFormatError("watermark ledger is truncated (no version byte)")
        version = data[len(LEDGER_MAGIC)]
        if version not in _READABLE_VERSIONS:
            raise SealedFormatError(
                f"watermark ledger version {version} is not supported (expected {LEDGER_VERSION})"
            )
        try:
            body = json.loads(data[len(LEDGER_MAGIC) + 1 :].decode())
            entries = [
                LedgerEntry(
                    account=str(d["account"]),
                    time=float(d["time"]),
                    model=str(d["model"]),
                    input=_arr_from_json(d["input"]),
                    answer=_arr_from_json(d["answer"]),
                    label=int(d["label"]),
                    original=int(d["original"]),
                    prior=float("nan") if d["prior"] is None else float(d["prior"]),
                    kind=_check_kind(str(d["kind"])),
                    threshold=float(d["threshold"]),
                    cell=str(d["cell"]),
                )
                for d in body["entries"]
            ]
            probes = [
                ProbeEntry(
                    account=str(d["account"]),
                    model=str(d["model"]),
                    input=_arr_from_json(d["input"]),
                    label=int(d["label"]),
                    margin=_finite(d["margin"]),
                    cell=str(d["cell"]),
                    output=None if d.get("output") is None else _arr_from_json(d["output"]),
                )
                for d in body.get("probes", [])
            ]
            signals = [
                SignalSpec(
                    model=str(d["model"]),
                    seed=bytes.fromhex(str(d["seed"])),
                    strength=_finite(d["strength"]),
                    input_scale=_finite(d["input_scale"]),
                    classes=int(d["classes"]),
                    threshold=_finite(d.get("threshold", 0.5)),
                    kind=str(d.get("kind", "probabilities")),
                )
                for d in body.get("signals", [])
            ]
            max_probes = int(body.get("max_probes", DEFAULT_MAX_PROBES))
            # Versions 1 and 2 have no band marks: the keys are simply absent.
            band = [
                BandEntry(
                    account=str(d["account"]),
                    model=str(d["model"]),
                    input=_arr_from_json(d["input"]),
                    cell=bytes.fromhex(str(d["cell"])),
                    top1=int(d["top1"]),
                    top2=int(d["top2"]),
                )
                for d in body.get("band", [])
            ]
            bands = [
                BandSpec(
                    model=str(d["model"]),
                    key=bytes.fromhex(str(d["key"])),
                    margin=_finite(d["margin"]),
                    rate=_finite(d["rate"]),
                )
                for d in body.get("bands", [])
            ]
            max_band_rows = int(body.get("max_band_rows", DEFAULT_MAX_BAND_ROWS))
            return cls(
                entries, probes=probes, signals=signals, max_probes=max_probes,
                band=band, bands=bands, max_band_rows=max_band_rows,
            )  # fmt: skip
        except (
            ValueError,
            KeyError,
            TypeError,
            UnicodeDecodeError,
            binascii.Error,
            ConfigError,
        ) as exc:
            raise SealedFormatError(f"watermark ledger is malformed: {exc}") from exc

    @classmethod
    def from_sealed(cls, blob: bytes, *, unseal: Callable[[bytes], bytes]) -> WatermarkLedger:
        """Unseal ``blob`` and parse it.

        Raises:
            SealedFormatError: the blob does not unseal or does not parse (errors raised
                by ``unseal`` that are already sealserve errors pass through unchanged).
        """
        try:
            plain = unseal(blob)
        except SealserveError:
            raise
        except Exception as exc:
            raise SealedFormatError(f"watermark ledger could not be unsealed: {exc}") from exc
        return cls.from_bytes(plain)


def _finite(v: Any) -> float:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


def _check_kind(kind: str) -> str:
    if kind not in ("class", "score"):
        raise ValueError(f"unknown entry kind {kind!r}")
    return kind
