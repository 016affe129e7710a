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
query returns the same alternative. Each marked answer is recorded in a
:class:`WatermarkLedger` (account, time, model, input, the answer given, the watermark
label) that :mod:`sealserve.defense.watermark.verify` later replays against a suspect.

The ledger holds client inputs, so it is sealed at rest: :meth:`WatermarkLedger.save`
takes a ``seal`` callable (the enclave's sealer) and :meth:`WatermarkLedger.load` its
``unseal``; nothing here writes a plaintext ledger to disk.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np

from sealserve.defense.outputs import OutputKind, OutputSpec
from sealserve.defense.watermark.signal import DEFAULT_MAX_PROBES, SignalSpec
from sealserve.errors import ConfigError, SealedFormatError, SealserveError

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_SCORE_MARGIN",
    "LEDGER_MAGIC",
    "LEDGER_VERSION",
    "LedgerEntry",
    "ProbeEntry",
    "Watermark",
    "WatermarkLedger",
]

DEFAULT_FRACTION = 0.002
"""Share of queries marked. Honest top-1 agreement is 1 - fraction in expectation
(99.8%), leaving room under the 99.5% target for the sampling spread of a few hundred
test inputs (on 450 inputs, about 94% of keys stay >= 99.5%); DAWN uses about 0.5%."""

DEFAULT_SCORE_MARGIN = 0.1
MAX_FRACTION = 0.2

LEDGER_MAGIC = b"SSWMLEDG"
LEDGER_VERSION = 2
_READABLE_VERSIONS = (1, 2)

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
    ) -> None:
        if max_probes < 0:
            raise ConfigError(f"max_probes must be >= 0, got {max_probes}")
        self._entries: list[LedgerEntry] = list(entries)
        self._lock = threading.Lock()
        self._max_probes = max_probes
        # (account, model) -> heap of (-margin, seq, probe), and the cells it holds.
        self._probes: dict[tuple[str, str], list[tuple[float, int, ProbeEntry]]] = {}
        self._probe_cells: dict[tuple[str, str], set[str]] = {}
        self._seq = 0
        self._signals: dict[str, SignalSpec] = {s.model: s for s in signals}
        self.add_probes(probes)

    def __len__(self) -> int:
        return len(self._entries)

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

    def set_signal(self, spec: SignalSpec) -> None:
        """Record the signal watermark of ``spec.model`` (first one wins: a model's
        seed never changes while its key does not)."""
        with self._lock:
            self._signals.setdefault(spec.model, spec)

    def signal(self, model: str) -> SignalSpec | None:
        with self._lock:
            return self._signals.get(model)

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
            return cls(entries, probes=probes, signals=signals, max_probes=max_probes)
        except (
            ValueError,
            KeyError,
            TypeError,
            UnicodeDecodeError,
            binascii.Error,
            ConfigError,
        ) as exc:
            raise SealedFormatError(f"watermark ledger is malformed: {exc}") from exc

    def save(self, path: str | os.PathLike[str], *, seal: Callable[[bytes], bytes]) -> None:
        """Seal the ledger with ``seal`` and write it atomically to ``path``."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(seal(self.to_bytes()))
        os.replace(tmp, target)

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

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, unseal: Callable[[bytes], bytes]
    ) -> WatermarkLedger:
        """Read, unseal and parse a ledger written by :meth:`save`.

        Raises:
            SealedFormatError: see :meth:`from_sealed`.
            OSError: the file cannot be read.
        """
        return cls.from_sealed(Path(path).read_bytes(), unseal=unseal)


def _finite(v: Any) -> float:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


def _check_kind(kind: str) -> str:
    if kind not in ("class", "score"):
        raise ValueError(f"unknown entry kind {kind!r}")
    return kind
