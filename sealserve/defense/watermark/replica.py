"""Comparing a suspect with the original: top-1 agreement on probe sets, against
independently trained reference models (``sealserve replica-check``).

Unlike :func:`sealserve.defense.watermark.verify.verify` this needs no ledger: it asks
whether the suspect agrees with the original more than models trained independently do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sealserve.defense.watermark.verify import Predict, predict_labels
from sealserve.errors import InputError

__all__ = ["STAND_OUT", "ProbeAgreement", "ReplicaReport", "boundary_inputs", "replica_check"]

STAND_OUT = 3.0
"""How many spreads of the reference models' agreement a suspect must stand out by in
:func:`replica_check` (with a handful of references, merely beating the best of them
happens to one innocent model in n + 1)."""
_MIN_SPREAD = 0.02  # the spread is estimated from few references: never below 2 points


def boundary_inputs(predict_proba: Predict, candidates: np.ndarray, *, count: int) -> np.ndarray:
    """The ``count`` candidates with the smallest top-1/top-2 probability margin."""
    p = np.asarray(predict_proba(candidates), dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InputError("boundary_inputs needs a predictor that returns class probabilities")
    top2 = np.sort(p, axis=1)[:, -2:]
    order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")
    return candidates[order[:count]]


@dataclass(frozen=True)
class ProbeAgreement:
    """Top-1 agreement of the suspect with the original on one probe set, and what
    independently trained reference models reach (mean, max and min)."""

    probe: str
    size: int
    agreement: float
    baseline_mean: float | None
    baseline_max: float | None
    baseline_min: float | None = None
    baseline_sd: float | None = None
    """Spread of the references' agreement (None for a fixed baseline)."""

    def _z(self) -> float | None:
        if self.baseline_mean is None or self.baseline_sd is None:
            return None
        return (self.agreement - self.baseline_mean) / max(self.baseline_sd, _MIN_SPREAD)

    @property
    def exceeds_baseline(self) -> bool:
        """Above every reference by a clear margin (``STAND_OUT`` spreads; with a fixed
        baseline, simply above it); on the watermark set also as far below (a suspect
        that gives the watermark answers disagrees with the original there)."""
        if self.baseline_max is None:
            return False
        z = self._z()
        if z is None:
            return self.agreement > self.baseline_max
        return (z >= STAND_OUT and self.agreement > self.baseline_max) or self.below_baseline

    @property
    def below_baseline(self) -> bool:
        if self.probe != "watermark" or self.baseline_min is None:
            return False
        z = self._z()
        if z is None:
            return self.agreement < self.baseline_min
        return z <= -STAND_OUT and self.agreement < self.baseline_min


@dataclass(frozen=True)
class ReplicaReport:
    """Outcome of :func:`replica_check`. ``replica_likely`` when the suspect agrees with
    the original beyond every reference on the boundary probes (where independent
    models disagree most), or on the watermark probes beyond or below every reference
    (below: it reproduces the watermark answers)."""

    probes: list[ProbeAgreement]
    replica_likely: bool
    basis: str = "references"
    """``references`` (independent models run on the same probes: a verdict) or
    ``orientation`` (fixed figures from another setting: no verdict is drawn)."""

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "probes": [asdict(p) | {"exceeds_baseline": p.exceeds_baseline} for p in self.probes],
            "replica_likely": self.replica_likely,
            "basis": self.basis,
        }
        return json.dumps(body, indent=2, sort_keys=True)

    def render(self) -> str:
        lines = ["Replica check: top-1 agreement with the original", ""]
        lines.append(f"  {'probe set':<12} {'n':>6} {'suspect':>8} {'indep. mean':>12} {'max':>6}")
        for p in self.probes:
            bm = "-" if p.baseline_mean is None else f"{p.baseline_mean:.1%}"
            bx = "-" if p.baseline_max is None else f"{p.baseline_max:.1%}"
            flag = (
                "  <- below every independent model (it gives the watermark answers)"
                if p.below_baseline
                else "  <- above every independent model"
                if p.exceeds_baseline
                else ""
            )
            lines.append(f"  {p.probe:<12} {p.size:>6} {p.agreement:>8.1%} {bm:>12} {bx:>6}{flag}")
        lines.append("")
        if self.basis == "orientation":
            lines.append(
                "  verdict: none. The baseline above was measured on the demo task with "
                "other models and inputs; train a few independent models and pass them "
                "as references for a verdict."
            )
        else:
            lines.append(
                "  verdict: "
                + (
                    "the suspect behaves like a replica"
                    if self.replica_likely
                    else "no replica signal"
                )
            )
        return "\n".join(lines)


def replica_check(
    original: Predict,
    suspect: Predict,
    probes: Mapping[str, np.ndarray],
    *,
    references: Sequence[Predict] = (),
    baseline: Mapping[str, float] | None = None,
    kind: str = "class",
    threshold: float = 0.5,
) -> ReplicaReport:
    """Compare ``suspect`` with ``original`` on named probe sets (for example
    ``"watermark"``, ``"boundary"``, ``"natural"``).

    The baseline for each set is the agreement of independently trained ``references``
    with the original (mean, max, min and spread); a suspect stands out when it is
    beyond every reference and ``STAND_OUT`` spreads (at least 2 points each) from
    their mean. Without references, ``baseline`` gives fixed values measured once
    (used as mean, max and min; standing out is then simply being above). Independent
    models agree on natural inputs almost as much as a replica does; the boundary and
    watermark sets are where a replica stands out.

    Raises:
        InputError: an empty probe set or a predictor output that is not labels.
    """
    results = []
    for name, x in probes.items():
        if len(x) == 0:
            raise InputError(f"probe set {name!r} is empty")
        o = predict_labels(original, x, kind, threshold)
        agree = float(np.mean(predict_labels(suspect, x, kind, threshold) == o))
        rates = [float(np.mean(predict_labels(r, x, kind, threshold) == o)) for r in references]
        bmean: float | None
        bmax: float | None
        bmin: float | None
        if rates:
            bmean, bmax, bmin = float(np.mean(rates)), float(np.max(rates)), float(np.min(rates))
            bsd: float | None = float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0
        elif baseline is not None and name in baseline:
            bmean = bmax = bmin = float(baseline[name])
            bsd = None
        else:
            bmean = bmax = bmin = bsd = None
        results.append(ProbeAgreement(name, len(x), agree, bmean, bmax, bmin, bsd))
    likely = any(p.exceeds_baseline for p in results if p.probe in ("boundary", "watermark"))
    return ReplicaReport(results, likely)
