"""Band marks: a watermark that label-only thieves inherit (issue 16, item 3b).

The scheme
----------
A row is *in the band* when the ORIGINAL model's top1 - top2 probability margin is
below ``margin`` (tau): the model itself is unsure there. A band row is *band-marked*
when a keyed coin says so::

    coin(cell) = BLAKE2b(key = band key; len(model) || model || cell)[:8] < rate * 2^64

(``cell`` = the coarsened input, :mod:`sealserve.defense.release.coarsen`, as for the DAWN
marks). A band-marked answer swaps the released values of the original top-1 and top-2,
so its label is the original runner-up: the flip sits where a replica learns it (next
to the boundary, towards the class the model nearly chose). Rows carrying a DAWN mark
are left alone. The coin depends on the model and the cell only, not on the account, so
sybils comparing answers see nothing. Honest cost: P_honest(margin < tau) * rate.

Recorded (:class:`BandEntry`, in the sealed ledger): every band row's input, cell, the
original top-1 and top-2 and the account, first-N distinct cells per (account, model)
(a cap chosen without the key). The flip is not recorded: the verifier recomputes the
coin from the model's :class:`BandSpec` (its per-model key, kept in the sealed ledger
like the signal seed).

The test (exact)
----------------
Replay the recorded band rows (one per distinct cell) to the suspect, labels only::

    D = cells where the suspect's label is the original top-2,
    k = |{c in D : coin(c) = 1}|,       p = P(Binomial(|D|, rate) >= k).

Why the null is exact -- every assumption it rests on:

1. The suspect did not learn from our answers (directly or through anyone who did):
   its answers on the replayed inputs do not depend on the band key.
2. Keyed BLAKE2b is a PRF: to anyone without the key, coins of distinct cells are
   independent Bernoulli(rate) (``rate * 2^64`` is exact to 2^-64).
3. What is replayed and pooled is chosen without the coins (by the original margin,
   arrival order, account membership, the suspect's top-1 agreement), and one test is
   run per suspect: several poolings or parameter sets need a Bonferroni correction
   (``verify`` doubles/triples the smallest of its p-values for that reason).
4. The original top-1/top-2 are those of the model that served (they are recorded).

Then ``D`` is a function of the suspect, the recorded inputs and the original model,
and ``k | D ~ Binomial(|D|, rate)`` exactly. No chance rate is estimated and nothing is
assumed about how an innocent model was trained or how often it picks runner-ups: a
model that prefers runner-ups at low margin only enlarges ``|D|``, which the binomial
accounts for. The binomial is discrete, hence conservative: ``P(p <= a) <= a``.

Why the power comes from rarity: DAWN's test examines only marked rows, so a reproduced
mark is worth ``1/(C-1)``; here every recorded band row is examined, so a reproduced
mark is worth ``rate`` (five reproduced marks and nothing else: 3e-7 at rate 0.05).

Adaptive senders (the one gap, and its fix): the binomial is exact for a window fixed
without the coins. A sender who sees the answers can choose later inputs, or when to
stop, from coins already revealed (framing an innocent model it can query). Each
runner-up cell's coin is still a fresh Bernoulli(rate) given everything before it, so
``E = prod_D (r/rate if coin else (1-r)/(1-rate))`` is a non-negative mean-1 martingale
and by Ville's inequality ``P(E >= 1/a ever) <= a``: :func:`evalue_bound` reports
``min(1, 1/E)`` with the alternative hit rate ``r = 0.5`` fixed in advance. Pooling by
:func:`select_accounts` is coin-free only for non-adaptive senders.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np
from scipy.stats import binom

from sealserve.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_BAND_MARGIN",
    "DEFAULT_BAND_RATE",
    "DEFAULT_MAX_BAND_ROWS",
    "BandEntry",
    "BandMark",
    "BandResult",
    "BandSpec",
    "band_test",
    "check_band",
    "evalue_bound",
    "select_accounts",
]

DEFAULT_BAND_MARGIN = 0.3
DEFAULT_BAND_RATE = 0.05
MAX_BAND_RATE = 0.2
DEFAULT_MAX_BAND_ROWS = 5000
"""Band rows kept per (account, model): the first distinct cells (chosen without the key)."""
DEFAULT_EVALUE_R = 0.5
SELECT_MIN_TOP1 = 0.85
SELECT_MIN_ROWS = 5

_TWO64 = float(2**64)


def check_band(margin: object, rate: object) -> tuple[float, float]:
    """Validate ``band = {margin, rate}``; return them as floats.

    Raises:
        ConfigError: margin not in (0, 1] or rate not in (0, 0.2].
    """
    for name, v in (("margin", margin), ("rate", rate)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"watermark.band.{name} must be a number, got {v!r}")
    assert isinstance(margin, int | float) and isinstance(rate, int | float)
    if not 0.0 < margin <= 1.0:
        raise ConfigError(
            f"watermark.band.margin must be in (0, 1] (a top1 - top2 probability margin), "
            f"got {margin!r}"
        )
    if not 0.0 < rate <= MAX_BAND_RATE:
        raise ConfigError(f"watermark.band.rate must be in (0, {MAX_BAND_RATE}], got {rate!r}")
    return float(margin), float(rate)


def _prefix(model: str) -> bytes:
    return len(model).to_bytes(4, "big") + model.encode()


@dataclass(frozen=True)
class BandSpec:
    """The verifier's view of one model's band marks (``key`` is secret; sealed ledger)."""

    model: str
    key: bytes
    margin: float
    rate: float

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ConfigError("band mark key must be at least 16 bytes")
        check_band(self.margin, self.rate)

    def coins(self, cells: Sequence[bytes]) -> np.ndarray:
        """The keyed coin of each cell (True = band-marked when in the band)."""
        prefix, key, cut = _prefix(self.model), self.key, int(self.rate * _TWO64)
        return np.array(
            [
                int.from_bytes(blake2b(prefix + c, key=key, digest_size=8).digest(), "big") < cut
                for c in cells
            ],
            dtype=bool,
        )


@dataclass(frozen=True)
class BandEntry:
    """One recorded band row: the input, its cell, the original top-1/top-2, who asked."""

    account: str
    model: str
    input: np.ndarray
    cell: bytes
    top1: int
    top2: int

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(self.cell).hexdigest()[:32]


class BandMark:
    """Decides and applies the band flips of one bound profile (all models).

    Args:
        key: the band secret (>= 16 bytes), derived from the root key.
        margin: the band: original top1 - top2 below this.
        rate: the coin probability.

    Raises:
        ConfigError: a parameter is out of range.
    """

    def __init__(self, *, key: bytes, margin: float, rate: float) -> None:
        self.margin, self.rate = check_band(margin, rate)
        if len(key) < 16:
            raise ConfigError("the band mark key must be at least 16 bytes")
        self._key = key
        self._cut = int(self.rate * _TWO64)
        self._specs: dict[str, BandSpec] = {}

    def spec(self, model: str) -> BandSpec:
        s = self._specs.get(model)
        if s is None:
            s = self._specs[model] = BandSpec(model, self._key, self.margin, self.rate)
        return s

    def _coin(self, prefix: bytes, cell: bytes) -> bool:
        d = blake2b(prefix + cell, key=self._key, digest_size=8).digest()
        return int.from_bytes(d, "big") < self._cut

    def select(
        self, x: np.ndarray, model: str, cells: Sequence[bytes]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """On the ORIGINAL probabilities ``x`` (n, C): the band rows, their top-1 and
        top-2, and which of them the coin marks. The keyed hash runs only for band rows;
        a batch of one takes a Python-float path."""
        if len(x) == 1:
            vals = x[0].tolist()
            i1 = max(range(len(vals)), key=vals.__getitem__)
            v1 = vals[i1]
            vals[i1] = -math.inf
            i2 = max(range(len(vals)), key=vals.__getitem__)
            if v1 - vals[i2] >= self.margin:
                return _NONE, _NONE, _NONE, _NOFLAG
            flag = np.array([self._coin(_prefix(model), cells[0])])
            return _ZERO_ROW, np.array([i1]), np.array([i2]), flag
        part = np.argpartition(x, -2, axis=1)[:, -2:]
        v = np.take_along_axis(x, part, axis=1)
        first = v[:, 1] >= v[:, 0]
        t1 = np.where(first, part[:, 1], part[:, 0])
        t2 = np.where(first, part[:, 0], part[:, 1])
        band = np.flatnonzero(np.abs(v[:, 1] - v[:, 0]) < self.margin)
        if len(band) == 0:
            return _NONE, _NONE, _NONE, _NOFLAG
        prefix = _prefix(model)
        flags = np.array([self._coin(prefix, cells[r]) for r in band.tolist()], dtype=bool)
        return band, t1[band], t2[band], flags


_NONE = np.zeros(0, dtype=np.int64)
_NOFLAG = np.zeros(0, dtype=bool)
_ZERO_ROW = np.zeros(1, dtype=np.int64)


@dataclass(frozen=True)
class BandResult:
    """Outcome of :func:`band_test`: distinct band cells replayed, ``|D|``, ``k``, the
    exact binomial p-value and the anytime-valid e-value bound."""

    examined: int
    runner_up: int
    hits: int
    rate: float
    p_value: float
    evalue_bound: float
    accounts: list[str]


def evalue_bound(k: int, m: int, rate: float, r: float = DEFAULT_EVALUE_R) -> float:
    """``min(1, 1/E)`` for ``k`` hits among ``m`` runner-up cells (module docstring)."""
    log_e = k * math.log(r / rate) + (m - k) * math.log((1 - r) / (1 - rate))
    return float(min(1.0, math.exp(-log_e))) if log_e > -700 else 1.0


def _dedupe(entries: Sequence[BandEntry]) -> list[BandEntry]:
    seen: set[bytes] = set()
    out = []
    for e in entries:
        if e.cell not in seen:
            seen.add(e.cell)
            out.append(e)
    return out


def _labels(
    predict: Callable[[np.ndarray], np.ndarray],
    entries: Sequence[BandEntry],
    to_labels: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    shapes = {e.input.shape for e in entries}
    if len(shapes) != 1:
        raise InputError(f"band rows have several input shapes {sorted(shapes)}")
    x = np.stack([e.input for e in entries])
    lab = to_labels(np.asarray(predict(x)))
    if lab.shape != (len(entries),):
        raise InputError(f"the suspect returned {lab.shape} labels for {len(entries)} band rows")
    return lab


def select_accounts(
    entries: Sequence[BandEntry],
    labels: np.ndarray,
    *,
    min_top1: float = SELECT_MIN_TOP1,
    min_rows: int = SELECT_MIN_ROWS,
) -> list[str]:
    """The accounts to pool, chosen WITHOUT the coins: those with at least ``min_rows``
    band rows on which the suspect (``labels``, one per entry) gives the original top-1
    at least ``min_top1`` of the time. A replica reproduces the labels it was trained on;
    on other people's band rows models agree far less. The rule reads only the
    suspect's answers and the records, so under the null the test stays exact.

    Its weakness: reproduced marks count against the fit, so an account with few band
    rows and several marks (2 of 8: 75%) is left out; pool known accounts instead."""
    by: dict[str, list[bool]] = {}
    for e, lab in zip(entries, labels.tolist(), strict=True):
        by.setdefault(e.account, []).append(lab == e.top1)
    return sorted(
        a for a, hits in by.items() if len(hits) >= min_rows and sum(hits) >= min_top1 * len(hits)
    )


def band_test(
    spec: BandSpec,
    entries: Sequence[BandEntry],
    suspect: Callable[[np.ndarray], np.ndarray],
    *,
    to_labels: Callable[[np.ndarray], np.ndarray],
    pool: bool = True,
) -> BandResult:
    """The exact band test of a suspect on recorded band rows (module docstring).

    With ``pool`` the accounts are chosen by :func:`select_accounts` (coin-free);
    otherwise every given entry is replayed (the caller chose the accounts).

    Raises:
        InputError: rows of several input shapes, or not one label per row.
    """
    rows = [e for e in entries if e.model == spec.model]
    if not rows:
        return BandResult(0, 0, 0, spec.rate, 1.0, 1.0, [])
    accounts = sorted({e.account for e in rows})
    if pool and len(accounts) > 1:
        # Ask once for every row, pick the accounts, then keep one row per cell.
        lab_all = _labels(suspect, rows, to_labels)
        accounts = select_accounts(rows, lab_all)
        keep = set(accounts)
        first: dict[bytes, tuple[BandEntry, int]] = {}
        for e, lab in zip(rows, lab_all.tolist(), strict=True):
            if e.account in keep:
                first.setdefault(e.cell, (e, lab))
        cells_e = [e for e, _ in first.values()]
        labels = np.array([lab for _, lab in first.values()], dtype=np.int64)
    else:
        cells_e = _dedupe(rows)
        labels = _labels(suspect, cells_e, to_labels)
    if not cells_e:
        return BandResult(0, 0, 0, spec.rate, 1.0, 1.0, accounts)
    top2 = np.array([e.top2 for e in cells_e], dtype=np.int64)
    d = np.flatnonzero(labels == top2)
    k = int(spec.coins([cells_e[i].cell for i in d]).sum()) if len(d) else 0
    m = len(d)
    p = float(binom.sf(k - 1, m, spec.rate)) if k > 0 else 1.0
    return BandResult(len(cells_e), m, k, spec.rate, p, evalue_bound(k, m, spec.rate), accounts)
