"""PRADA: the distance-distribution test of Juuti et al.

M. Juuti, S. Szyller, S. Marchal, N. Asokan. "PRADA: Protecting against DNN Model
Stealing Attacks." IEEE EuroS&P 2019 (arXiv:1805.02628), Algorithm 1.

Benign queries are natural samples, so the minimum L2 distance of each new query to
the earlier queries of the same predicted class is roughly normally distributed;
synthetic extraction queries (small steps around seed points, Jacobian augmentation)
give a distribution that is not. Per account and per predicted class ``c`` the
algorithm keeps a growing set ``G_c``, the distances ``DG_c`` that admitted its members
and a threshold ``T_c``:

1. First query of class ``c``: ``G_c = {x}``; no distance is recorded.
2. Otherwise ``d_min = min_{y in G_c} ||x - y||_2`` is appended to the account's
   distance set ``D``.
3. If ``d_min > T_c``: ``x`` joins ``G_c``, ``d_min`` joins ``DG_c`` and
   ``T_c = max(T_c, mean(DG_c) - std(DG_c))``.
4. Once ``|D| > N`` (paper: 100), remove outliers beyond ``mean(D) +- 3 std(D)`` and run
   the Shapiro-Wilk test on what is left; the account is flagged when ``W < delta``.
   The paper tunes ``delta`` per model on benign traffic; here it is ``delta`` in the
   config (default 0.78, set from split A of the digits demo, see docs/detection-audit.md).

Deviations, all to bound cost and state (DESIGN: at most 1 MB per account):
- ``G_c`` is capped at ``class_cap`` vectors (stored as float16) and kept as a uniform
  reservoir of the vectors admitted by step 3 once full;
- ``D`` keeps the most recent ``max_distances`` values (Shapiro-Wilk is valid to 5000);
- the test runs every ``test_every`` distances (the score in between is the last one),
  and the score uses the highest W of the last ``confirm_tests`` tests, so a single
  low W from a small early sample does not flag an honest account by itself;
- an exact repeat of an earlier query (``d_min == 0``) is not added to ``D``: it gives
  the caller no new information and honest clients retry.

Score: 0.5 at ``W == delta`` (the paper's flag point), rising linearly to 1 at
``W == delta - span`` and falling to 0 at ``W == delta + span``.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from sealserve.defense.detect.base import DetectorScore, coerce_query, require
from sealserve.defense.detect.cache import load_state, save_state
from sealserve.defense.detect.state import BlobStore, state_key

_KIND_HEADER = 1
_KIND_CLASS = 2
# counters: seen, distances recorded, repeats skipped, distances since last test, ring pos
_SEEN, _ND, _DUP, _SINCE, _POS = range(5)


@dataclass(frozen=True, slots=True)
class PradaConfig:
    """Parameters of :class:`PradaDetector` (see the module docstring for their role)."""

    n_features: int
    n_classes: int
    delta: float = 0.78
    min_distances: int = 100
    max_distances: int = 1000
    class_cap: int = 256
    test_every: int = 25
    confirm_tests: int = 3
    span: float = 0.1
    state_budget_bytes: int = 800_000
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        require(self.n_features > 0, "prada.n_features must be positive")
        require(self.n_classes > 0, "prada.n_classes must be positive")
        require(0.0 < self.delta < 1.0, "prada.delta must be in (0, 1)")
        require(
            3 <= self.min_distances <= self.max_distances <= 5000,
            "prada needs 3 <= min_distances <= max_distances <= 5000 (Shapiro-Wilk)",
        )
        require(self.class_cap >= 1, "prada.class_cap must be at least 1")
        require(self.test_every >= 1, "prada.test_every must be at least 1")
        require(1 <= self.confirm_tests <= 100, "prada.confirm_tests must be in 1..100")
        require(0.0 < self.span <= 1.0, "prada.span must be in (0, 1]")
        require(
            self.effective_class_cap() >= 8,
            "prada.state_budget_bytes too small for n_classes x n_features",
        )

    def effective_class_cap(self) -> int:
        """``class_cap`` lowered so that all classes' sets fit the state budget."""
        header = 256 + 4 * self.max_distances + 40 * self.n_classes
        per_class = max(0, self.state_budget_bytes - header) // (
            self.n_classes * (2 * self.n_features + 16)
        )
        return int(min(self.class_cap, per_class))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PradaConfig:
        """Build from a config mapping. Raises ``ConfigError`` on unknown/bad keys."""
        result: PradaConfig = _from_mapping(cls, data, "prada")
        return result


def _from_mapping(cls: Any, data: Mapping[str, Any], section: str) -> Any:
    from sealserve.errors import ConfigError

    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    require(not unknown, f"{section}: unknown keys {unknown} (known: {sorted(known)})")
    try:
        return cls(**dict(data))
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from exc


class PradaDetector:
    """PRADA per (account, model), with state in a :class:`BlobStore`."""

    name = "prada"

    def __init__(self, config: PradaConfig, store: BlobStore) -> None:
        self.config = config
        self.store = store
        self._cap = config.effective_class_cap()

    def _key(self, account: str, model: str) -> str:
        return state_key("prada", model, account)

    def observe(self, account: str, model: str, x: object, label: object) -> DetectorScore:
        return self.observe_at_time(account, model, x, label, now=time.time())

    def observe_at_time(
        self, account: str, model: str, x: object, label: object, *, now: float
    ) -> DetectorScore:
        """Run one step of Algorithm 1. Raises ``UnavailableError`` if the store fails."""
        cfg = self.config
        key = self._key(account, model)
        meta, ring = self._load_header(key)
        # Views into one float64 vector (one array to (de)serialise, not six).
        n_c = cfg.n_classes
        k = 5 + cfg.confirm_tests
        counters, last = meta[:5], meta[5:k]
        thresh = meta[k : k + n_c]
        dg_stats = meta[k + n_c : k + 4 * n_c].reshape(n_c, 3)
        added = meta[k + 4 * n_c : k + 5 * n_c]
        parsed = coerce_query(x, label, n_features=cfg.n_features, n_classes=cfg.n_classes)
        if isinstance(parsed, str):
            return self._score(last, counters, note=parsed)
        vec, c = parsed
        if float(np.abs(vec).max()) > 65504.0:  # largest finite float16
            return self._score(last, counters, note="input ignored: values overflow float16")
        x16 = vec.astype(np.float16)
        ckey = f"{key}/{c}"
        stored = load_state(self.store, ckey, _KIND_CLASS)
        members = np.empty((0, cfg.n_features), np.float16) if stored is None else stored[0]
        counters[_SEEN] += 1
        if members.shape[0] == 0:
            # 1. the first query of a class starts its growing set.
            members = x16[None, :]
            added[c] += 1
            save_state(self.store, ckey, _KIND_CLASS, [members], ttl_s=cfg.ttl_s)
        else:
            # 2. minimum distance to the class's growing set (in float16-rounded space,
            # so an exact repeat is exactly 0).
            diff = members.astype(np.float32) - x16.astype(np.float32)
            d_min = float(np.sqrt(np.min(np.einsum("ij,ij->i", diff, diff))))
            if d_min == 0.0:
                counters[_DUP] += 1
            else:
                ring[int(counters[_POS])] = d_min
                counters[_POS] = (counters[_POS] + 1) % cfg.max_distances
                counters[_ND] += 1
                counters[_SINCE] += 1
            # 3. admit to G_c and raise T_c.
            if d_min > thresh[c]:
                n, mean, m2 = dg_stats[c]
                n += 1
                delta = d_min - mean
                mean += delta / n
                m2 += delta * (d_min - mean)
                dg_stats[c] = (n, mean, m2)
                std = math.sqrt(m2 / n)
                thresh[c] = max(thresh[c], mean - std)
                added[c] += 1
                if members.shape[0] < self._cap:
                    members = np.concatenate([members, x16[None, :]])
                else:
                    j = random.randrange(int(added[c]))  # reservoir sampling
                    if j < self._cap:
                        members[j] = x16
                save_state(self.store, ckey, _KIND_CLASS, [members], ttl_s=cfg.ttl_s)
        # 4. Shapiro-Wilk on the (trimmed) distance set.
        n_valid = int(min(counters[_ND], cfg.max_distances))
        due = counters[_SINCE] >= cfg.test_every or last[-1] < 0
        if n_valid > cfg.min_distances and due:
            last[:-1] = last[1:]
            last[-1] = _shapiro_w(ring[:n_valid])
            counters[_SINCE] = 0
        save_state(self.store, key, _KIND_HEADER, [meta, ring], ttl_s=cfg.ttl_s)
        return self._score(last, counters, note="")

    def _load_header(self, key: str) -> list[npt.NDArray[Any]]:
        cfg = self.config
        arrays = load_state(self.store, key, _KIND_HEADER)
        size = 5 + cfg.confirm_tests + 5 * cfg.n_classes
        if arrays is None:
            meta = np.zeros(size, np.float64)
            meta[5 : 5 + cfg.confirm_tests] = -1.0  # no W yet
            return [meta, np.zeros(cfg.max_distances, np.float32)]
        if (
            len(arrays) != 2
            or arrays[0].shape != (size,)
            or arrays[1].shape != (cfg.max_distances,)
        ):
            from sealserve.errors import UnavailableError

            raise UnavailableError(f"detector state under {key!r} has another configuration")
        return arrays

    def _score(
        self, last: npt.NDArray[Any], counters: npt.NDArray[Any], *, note: str
    ) -> DetectorScore:
        cfg = self.config
        n_valid = int(min(counters[_ND], cfg.max_distances))
        prefix = f"{note}; " if note else ""
        # The least suspicious of the last ``confirm_tests`` results: one low W from a
        # small early sample does not flag an account on its own.
        w = float(np.max(last)) if float(np.min(last)) >= 0 else -1.0
        if w < 0:
            return DetectorScore(
                self.name,
                0.0,
                lambda: (
                    f"{prefix}PRADA: {n_valid} distances; testing starts after "
                    f"{cfg.min_distances} and judges after {cfg.confirm_tests} tests"
                ),
                ready=False,
                metrics={"distances": float(n_valid)},
            )
        score = min(1.0, max(0.0, 0.5 + (cfg.delta - w) / (2 * cfg.span)))
        verdict = "below" if w < cfg.delta else "above"
        return DetectorScore(
            self.name,
            score,
            lambda: (
                f"{prefix}PRADA: Shapiro-Wilk W={w:.3f} over the last {n_valid} minimum "
                f"distances, {verdict} the threshold {cfg.delta:.3f}"
                + (" (query distances are not normal: synthetic-looking)" if w < cfg.delta else "")
            ),
            metrics={"prada_w": round(w, 4), "distances": float(n_valid)},
        )


def _shapiro_w(d: npt.NDArray[np.float32]) -> float:
    """Shapiro-Wilk W of ``d`` after removing values beyond mean +- 3 std (step 4)."""
    d64 = d.astype(np.float64)
    mu, sd = float(d64.mean()), float(d64.std())
    kept = d64[np.abs(d64 - mu) <= 3 * sd] if sd > 0 else d64
    if kept.size < 3 or float(np.ptp(kept)) == 0.0:
        # All distances equal: a perfectly regular grid, not natural data.
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = float(stats.shapiro(kept).statistic)
    return w if math.isfinite(w) else 0.0
