"""Distance of an account's queries from honest traffic, and how much space they cover.

PRADA misses extraction streams whose queries are spread widely: uniform sweeps,
synthetic noise and natural data from another task (off-task, out-of-distribution).
This detector compares each account's recent queries with a reference sample of
natural inputs supplied by the owner (for example part of the training set):

* **Outliers.** A query is an outlier when its nearest-reference-neighbour distance
  (features standardised with the reference's mean and std; neighbours taken among
  the reference rows of the query's predicted class when labels are supplied) exceeds
  the reference's own ``quantile`` (default 99th percentile) of leave-one-out
  nearest-neighbour distances. Among the last ``window`` queries, the outlier count is
  tested against the honest rate ``expected_outlier_rate`` with an exact one-sided binomial test
  (scipy.stats.binom). Score 0.5 at p-value ``alpha``, 1 at ``alpha**2`` (log scale).
* **Coverage.** Each feature's value range is cut into ``bins`` equal bins; coverage
  is the fraction of (feature, bin) cells the last ``window`` queries touched, divided
  by the fraction that the same number of independent honest draws from the reference
  would touch in expectation. A uniform sweep touches every cell. Score 0.5 at
  ``coverage_flag_ratio``, 0 at ratio 1.

The score is the larger of the two. State per (account, model): the last ``window``
outlier bits and bin indices plus per-cell counts (a few tens of KB for 64 features).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from sealserve.defense.detect.base import DetectorScore, coerce_query, require
from sealserve.defense.detect.cache import load_state, save_state
from sealserve.defense.detect.prada import _from_mapping
from sealserve.defense.detect.state import BlobStore, state_key
from sealserve.errors import ConfigError, UnavailableError

_KIND = 3


@dataclass(frozen=True, slots=True)
class DistributionConfig:
    """Parameters of :class:`DistributionDetector` (module docstring explains each)."""

    n_features: int
    n_classes: int | None = None
    quantile: float = 0.99
    expected_outlier_rate: float = 0.05
    alpha: float = 1e-8
    window: int = 200
    min_queries: int = 20
    max_reference: int = 500
    bins: int = 8
    coverage_flag_ratio: float = 1.25
    value_range: tuple[float, float] | None = None
    seed: int = 0
    state_budget_bytes: int = 200_000
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        require(self.n_features > 0, "distribution.n_features must be positive")
        require(0.5 < self.quantile < 1.0, "distribution.quantile must be in (0.5, 1)")
        require(
            0.0 < self.expected_outlier_rate < 0.5,
            "distribution.expected_outlier_rate must be in (0, 0.5)",
        )
        require(0.0 < self.alpha < 0.05, "distribution.alpha must be in (0, 0.05)")
        require(10 <= self.window <= 4096, "distribution.window must be in 10..4096")
        require(
            1 <= self.min_queries <= self.window, "distribution.min_queries must be in 1..window"
        )
        require(self.max_reference >= 20, "distribution.max_reference must be at least 20")
        require(2 <= self.bins <= 255, "distribution.bins must be in 2..255")
        require(self.coverage_flag_ratio > 1.0, "distribution.coverage_flag_ratio must be > 1")
        state = self.window * (self.n_features + 1) + 2 * self.n_features * self.bins + 64
        require(
            state <= self.state_budget_bytes,
            f"distribution state would take {state} bytes per account, over "
            f"state_budget_bytes={self.state_budget_bytes}: lower window or bins",
        )
        if self.value_range is not None:
            lo, hi = self.value_range
            require(hi > lo, "distribution.value_range must be (low, high) with high > low")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DistributionConfig:
        """Build from a config mapping. Raises ``ConfigError`` on unknown/bad keys."""
        data = dict(data)
        if "value_range" in data and data["value_range"] is not None:
            try:
                lo, hi = data["value_range"]
                data["value_range"] = (float(lo), float(hi))
            except (TypeError, ValueError) as exc:
                raise ConfigError("distribution.value_range must be [low, high]") from exc
        result: DistributionConfig = _from_mapping(cls, data, "distribution")
        return result


class DistributionDetector:
    """Outlier rate and input-space coverage of an account versus honest traffic."""

    name = "distribution"

    def __init__(
        self,
        config: DistributionConfig,
        store: BlobStore,
        reference: object,
        *,
        reference_labels: object = None,
    ) -> None:
        """Fit to ``reference`` (n x n_features natural inputs, n >= 20).

        ``reference_labels`` are the model's predicted labels for the reference rows;
        with them, distances are measured to the reference images of the query's
        predicted class (classes with fewer than 10 reference rows use the whole set).
        Raises ``ConfigError`` if the reference is not a finite 2-D sample of the
        configured width or the labels do not match it.
        """
        self.config = config
        self.store = store
        try:
            ref = np.asarray(reference, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError("distribution reference is not a numeric array") from exc
        if ref.ndim != 2 or ref.shape[1] != config.n_features or ref.shape[0] < 20:
            raise ConfigError(
                f"distribution reference must be (n >= 20, {config.n_features}); got {ref.shape}"
            )
        if not np.all(np.isfinite(ref)):
            raise ConfigError("distribution reference contains NaN or infinity")
        self._mu = ref.mean(axis=0)
        sd = ref.std(axis=0)
        # A feature constant in the reference still counts when a query moves it.
        self._sd = np.maximum(sd, max(float(np.mean(sd)) * 0.1, 1e-12))
        rng = np.random.default_rng(config.seed)
        labels = self._labels(reference_labels, ref.shape[0])
        if ref.shape[0] > config.max_reference:
            idx = np.sort(rng.choice(ref.shape[0], config.max_reference, replace=False))
            index, labels = ref[idx], labels[idx]
        else:
            index = ref
        order = np.argsort(labels, kind="stable")
        index, labels = index[order], labels[order]
        self._index = ((index - self._mu) / self._sd).astype(np.float32)
        self._index_sq = np.einsum("ij,ij->i", self._index, self._index)
        # Per predicted class: its slice of the index and its own threshold, the
        # ``quantile`` of leave-one-out nearest-neighbour distances within the class
        # (class-conditional, so a natural "7" labelled "1" is far from every real "1").
        self._slices: dict[int, slice] = {}
        self._thresholds: dict[int, float] = {}
        z = self._index.astype(np.float64)
        loo_all = np.empty(z.shape[0])
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            sl = slice(int(rows[0]), int(rows[-1]) + 1)
            zc = z[sl]
            sq = np.einsum("ij,ij->i", zc, zc)
            d2 = sq[:, None] + sq[None, :] - 2 * zc @ zc.T
            np.fill_diagonal(d2, np.inf)
            loo = np.sqrt(np.maximum(d2.min(axis=1), 0.0)) if rows.size > 1 else np.zeros(1)
            loo_all[sl] = loo
            if rows.size >= 10:
                self._slices[int(c)] = sl
                self._thresholds[int(c)] = float(np.quantile(loo, config.quantile))
        self.threshold = float(np.quantile(loo_all, config.quantile))
        # Per-class (index, squared norms, threshold), float64 so a query needs no casts.
        z64 = self._index.astype(np.float64)
        sq64 = np.einsum("ij,ij->i", z64, z64)
        self._inv_sd = 1.0 / self._sd
        self._all = (z64, sq64, self.threshold)
        self._by_class = {
            c: (z64[sl], sq64[sl], self._thresholds[c]) for c, sl in self._slices.items()
        }
        # Binomial upper tail P(K >= k | n, p0) for every window length n and count k.
        n = np.arange(config.window + 1)[:, None]
        k = np.arange(config.window + 1)[None, :]
        with np.errstate(all="ignore"):
            sf = stats.binom.sf(k - 1, n, config.expected_outlier_rate)
        self._log10_sf = np.log10(np.clip(np.nan_to_num(sf, nan=0.0), 1e-300, 1.0))
        # Coverage cells and the expected coverage of n honest draws.
        lo, hi = config.value_range or (float(ref.min()), float(ref.max()))
        if hi <= lo:
            hi = lo + 1.0
        self._lo, self._scale = lo, config.bins / (hi - lo)
        ref_bins = self._bins(ref)
        p = np.zeros((config.n_features, config.bins))
        for f in range(config.n_features):
            p[f] = np.bincount(ref_bins[:, f], minlength=config.bins) / ref.shape[0]
        counts_n = np.arange(config.window + 1)[:, None, None]
        self._expected_cov = np.mean(1.0 - (1.0 - p[None]) ** counts_n, axis=(1, 2))
        self._rows = np.arange(config.n_features)

    @staticmethod
    def _labels(labels: object, n: int) -> npt.NDArray[np.int64]:
        if labels is None:
            return np.zeros(n, np.int64)
        try:
            arr = np.asarray(labels).astype(np.int64, casting="unsafe").reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ConfigError("distribution reference_labels are not integers") from exc
        if arr.size != n:
            raise ConfigError(f"distribution reference_labels has {arr.size} rows, expected {n}")
        return arr

    def _bins(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
        b = np.floor((x - self._lo) * self._scale)
        np.maximum(b, 0, out=b)
        np.minimum(b, self.config.bins - 1, out=b)
        return b.astype(np.uint8)

    def _key(self, account: str, model: str) -> str:
        return state_key("distribution", model, account)

    def is_outlier(self, x: npt.NDArray[np.float64], label: int) -> bool:
        """Whether ``x`` (predicted ``label``) is farther from the reference than usual."""
        index, index_sq, thr = self._by_class.get(label, self._all)
        z = (x - self._mu) * self._inv_sd
        d2 = float((index_sq - 2.0 * (index @ z)).min()) + float(z @ z)
        return d2 > thr * thr

    def observe(self, account: str, model: str, x: object, label: object) -> DetectorScore:
        return self.observe_at_time(account, model, x, label, now=time.time())

    def observe_at_time(
        self, account: str, model: str, x: object, label: object, *, now: float
    ) -> DetectorScore:
        """Record one query. Raises ``UnavailableError`` if the store fails."""
        cfg = self.config
        key = self._key(account, model)
        counters, outl, bins, counts = self._load(key)
        parsed = coerce_query(x, label, n_features=cfg.n_features, n_classes=cfg.n_classes)
        if isinstance(parsed, str):
            return self._score(counters, outl, counts, note=parsed)
        vec, lab = parsed
        pos = int(counters[1])
        if counters[0] >= cfg.window:
            counts[self._rows, bins[pos]] -= 1
            counters[2] -= int(outl[pos])
        new_bins = self._bins(vec)
        bins[pos] = new_bins
        counts[self._rows, new_bins] += 1
        is_out = self.is_outlier(vec, lab)
        outl[pos] = is_out
        counters[2] += is_out  # outliers in the window, kept running
        counters[0] += 1
        counters[1] = (pos + 1) % cfg.window
        save_state(self.store, key, _KIND, [counters, outl, bins, counts], ttl_s=cfg.ttl_s)
        return self._score(counters, outl, counts, note="")

    def _load(self, key: str) -> list[npt.NDArray[Any]]:
        cfg = self.config
        arrays = load_state(self.store, key, _KIND)
        if arrays is None:
            return [
                np.zeros(3, np.int64),  # seen, ring position, outliers in window
                np.zeros(cfg.window, np.uint8),
                np.zeros((cfg.window, cfg.n_features), np.uint8),
                np.zeros((cfg.n_features, cfg.bins), np.uint16),
            ]
        if (
            len(arrays) != 4
            or arrays[0].shape != (3,)
            or arrays[2].shape != (cfg.window, cfg.n_features)
        ):
            raise UnavailableError(f"detector state under {key!r} has another configuration")
        return arrays

    def _score(
        self,
        counters: npt.NDArray[Any],
        outl: npt.NDArray[Any],
        counts: npt.NDArray[Any],
        *,
        note: str,
    ) -> DetectorScore:
        cfg = self.config
        n = int(min(counters[0], cfg.window))
        prefix = f"{note}; " if note else ""
        k = int(counters[2])
        log10_p = float(self._log10_sf[n, k])
        if n < cfg.min_queries:
            # Too few rows to judge alone; the young account's own outlier count still
            # goes out (the cohort view reads it: release/cohort.py).
            return DetectorScore(
                self.name,
                0.0,
                lambda: (
                    f"{prefix}Distribution: {n} of {cfg.min_queries} queries needed before judging"
                ),
                ready=False,
                metrics={"queries": float(n), "outliers": float(k), "log10_p": log10_p},
            )
        s_out = min(1.0, max(0.0, 0.5 * log10_p / math.log10(cfg.alpha)))
        coverage = float(np.count_nonzero(counts)) / counts.size
        ratio = coverage / max(float(self._expected_cov[n]), 1e-12)
        s_cov = min(1.0, max(0.0, 0.5 * (ratio - 1.0) / (cfg.coverage_flag_ratio - 1.0)))
        score = max(s_out, s_cov)
        expected = float(self._expected_cov[n])

        def explanation() -> str:  # formatted only when read
            return (
                f"{prefix}Distribution: {k} of the last {n} queries ({100 * k / n:.1f}%) lie "
                f"farther from the honest reference than {100 * cfg.quantile:g}% of it (honest "
                f"rate {100 * cfg.expected_outlier_rate:g}%, binomial p=10^{log10_p:.1f}); "
                f"input-space coverage {coverage:.2f} vs {expected:.2f} "
                f"expected for honest traffic ({ratio:.2f}x)"
            )

        return DetectorScore(
            self.name,
            score,
            explanation,
            metrics={
                "queries": float(n),  # as for a young account: the cohort view reads them
                "outliers": float(k),
                "outlier_rate": k / n,
                "log10_p": log10_p,
                "coverage": coverage,
                "coverage_ratio": ratio,
            },
        )
