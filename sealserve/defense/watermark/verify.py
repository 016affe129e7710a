"""Proving a watermark on a suspect model (the replica check is in :mod:`.replica`).

Over 400 lines: the marks and signal tests share the chance-rate reasoning below.

:func:`verify` replays the ledger's inputs to a suspect and tests whether it
reproduces the watermark labels more often than a model that never saw them would.

How the chance rate is estimated (and why it is honest)
-------------------------------------------------------
For a classifier with ``C >= 3`` classes the watermark label of an entry is the
original top-1 plus a keyed offset drawn uniformly from ``1 .. C-1`` (keyed BLAKE2b,
independent of the selection bits). A model that never saw our answers cannot know that
offset. So, *conditionally on the suspect's own labels*, on every entry where the suspect
disagrees with the original top-1 it hits the watermark label with probability exactly
``1 / (C - 1)``, and where it agrees it cannot hit it. Entries that share a coarsened
cell share one offset, so they are counted once. The number of matches of an innocent
model is then Binomial(m, 1/(C-1)) with ``m`` its count of disagreeing cells: an exact
null distribution ("key randomisation"), with no assumption about how the innocent
model was trained. The chance rate reported is ``m / (n (C-1))``, the match rate expected
by chance given the suspect's disagreements; the p-value is the one-sided
``scipy.stats.binomtest(k, m, 1/(C-1), alternative="greater")``.

For scores and two-class outputs the alternative is forced (the other side), so the
label carries no key randomness; the evidence is *which* inputs were flipped. There the
chance rate is the rate at which the suspect disagrees with the original on ``controls``
(natural inputs from the same distribution that were not marked), taken at the upper
end of its exact 99% confidence interval (Clopper-Pearson), and the test is
``binomtest(k, n, chance)``. Without controls no honest estimate exists and
:func:`verify` refuses.

The signal test
---------------
When the ledger holds the model's signal watermark (:mod:`sealserve.defense.watermark.signal`)
and boundary probes, :func:`verify` also replays the probes nearest a decision boundary
(up to ``signal_probes``) and computes ``z = <W, M> / sd``, whose null distribution is
exactly standard normal (see that module). It is the test that catches replicas too
simple to memorise the marks (logistic regression). Two tests are run, so the
reported ``p_value`` is the Bonferroni combination ``min(1, 2 * min(p_marks,
p_signal))``, which is a valid p-value whatever the dependence between the two.

The band test
-------------
When the ledger holds band marks (:mod:`sealserve.defense.watermark.band`) and band rows,
:func:`verify` replays them, labels only, and runs the exact binomial test described
there (accounts pooled by the suspect's top-1 fit, a coin-free rule). With ``t`` tests
run (marks, signal, band) the reported ``p_value`` is ``min(1, t * min(p_i))``
(Bonferroni), valid whatever their dependence.

Optional ``references`` (independently trained models) are run through the same tests
and reported: they are a visible check that the test makes no false claim.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

import numpy as np
from scipy.stats import binomtest, norm

from sealserve.defense.outputs import OutputKind
from sealserve.defense.watermark.band import BandResult, band_test
from sealserve.defense.watermark.ledger import LedgerEntry, ProbeEntry, WatermarkLedger
from sealserve.defense.watermark.signal import SignalSpec, log_scores
from sealserve.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_ALPHA",
    "Predict",
    "SignalResult",
    "VerifyReport",
    "predict_labels",
    "to_labels",
    "verify",
]

Predict = Callable[[np.ndarray], np.ndarray]
"""A suspect: inputs (batch, ...) -> labels (batch,) or probabilities/scores."""

DEFAULT_ALPHA = 1e-6
DEFAULT_SIGNAL_PROBES = 1000
_GRAM_RIDGE = 1e-3
MIN_SIGNAL_PROBES = 20
_CONTROL_CONFIDENCE = 0.99


def to_labels(pred: np.ndarray, *, kind: str = "class", threshold: float = 0.5) -> np.ndarray:
    """Turn a predictor's output into labels.

    Integer 1-D output is taken as labels; 2-D output with several columns as
    scores/probabilities (argmax); for ``kind="score"`` a single column or 1-D float
    output is compared with ``threshold``.

    Raises:
        InputError: the output has a shape that gives no label per row.
    """
    a = np.asarray(pred)
    if a.ndim == 1 and a.dtype.kind in "biu":
        return a.astype(np.int64)
    if a.ndim == 2 and a.shape[1] > 1:
        am: np.ndarray = np.argmax(a, axis=1).astype(np.int64)
        return am
    if kind == "score" and (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):
        return (a.reshape(-1) > threshold).astype(np.int64)
    if a.ndim == 1 and a.dtype.kind == "f" and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise InputError(f"the suspect returned an output of shape {a.shape} that is not labels")


def predict_labels(predict: Predict, inputs: np.ndarray, kind: str, threshold: float) -> np.ndarray:
    labels = to_labels(predict(inputs), kind=kind, threshold=threshold)
    if labels.shape != (len(inputs),):
        raise InputError(f"the suspect returned {labels.shape[0]} answers for {len(inputs)} inputs")
    return labels


@dataclass(frozen=True)
class ReferenceResult:
    matches: int
    p_value: float


@dataclass(frozen=True)
class SignalResult:
    """Outcome of the signal test: probes replayed, how many the suspect labels
    differently from the original, the z statistic and its one-sided p-value."""

    probes: int
    disagreements: int
    z: float
    p_value: float
    mode: str = "labels"
    """``scores`` when the suspect's probabilities/logits were compared, else ``labels``."""


def _suspect_scores(raw: np.ndarray, spec: SignalSpec) -> np.ndarray | None:
    """The suspect's output as centred log-scores (like the ledger's), or None when
    it gives only labels."""
    a = np.asarray(raw)
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
        return None
    if spec.classes == 1:
        v = a.reshape(-1) if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1) else None
        if v is None or np.all(v == np.round(v)) or v.min() < 0 or v.max() > 1:
            return None
        return log_scores(v, OutputKind.SCORE)
    if a.ndim != 2 or a.shape[1] != spec.classes:
        return None
    probs = a.min() >= 0 and a.max() <= 1 and np.allclose(a.sum(axis=1), 1.0, atol=0.02)
    return log_scores(a, OutputKind.PROBABILITIES if probs else OutputKind.LOGITS)


def signal_test(spec: SignalSpec, probes: Sequence[ProbeEntry], raw: np.ndarray) -> SignalResult:
    """The exact Gaussian test of :mod:`sealserve.defense.watermark.signal` on the suspect's
    output ``raw`` for ``probes`` (labels, or probabilities/logits/scores).

    With scores, ``M = (sum_i (s_i - o_i) f(x_i)^T) G^-1`` where ``s_i`` and ``o_i`` are
    the suspect's and the original's centred log-scores and ``G`` the probes' feature
    Gram matrix (plus a small ridge); with labels only,
    ``M = sum_i (e_{a_i} - e_{o_i}) f(x_i)^T``. Either way ``M`` does not depend on
    ``W`` unless the suspect learnt from our answers, so ``<W, M>`` is exactly
    N(0, ||M||^2 / (d + 1)) for an innocent suspect.

    Raises:
        InputError: a label outside the model's classes, an output that is not one
            answer per probe, or probes of several shapes.
    """
    if len(probes) == 0:
        return SignalResult(0, 0, 0.0, 1.0)
    x = _stack_inputs(probes)
    kind = "score" if spec.classes == 1 else "class"
    lab = predict_labels(lambda _: raw, x, kind, spec.threshold)
    rows = spec.rows
    if lab.min() < 0 or lab.max() >= rows:
        raise InputError(f"the suspect returned a label outside 0..{rows - 1}")
    orig = np.array([p.label for p in probes], dtype=np.int64)
    dis = int(np.sum(lab != orig))
    f = spec.features(x)
    sus = _suspect_scores(raw, spec)
    if sus is not None and all(p.output is not None for p in probes):
        ref = log_scores(np.stack([np.asarray(p.output) for p in probes]), spec.kind)
        d = sus - ref
        if spec.classes == 1:  # row 0 of W ("below") is zero
            d = np.hstack([np.zeros_like(d), d])
        # Whitened by the probes' feature Gram matrix (which does not depend on W):
        # M G^-1 estimates the linear part of the suspect's deviation, so the
        # replica's own smooth misfit weighs less against the learnt tilt.
        gram = f.T @ f / len(f) + _GRAM_RIDGE * np.eye(f.shape[1])
        m = np.linalg.solve(gram, f.T @ d).T
        mode = "scores"
    else:
        eye = np.eye(rows)
        m = (eye[lab] - eye[orig]).T @ f
        mode = "labels"
    w = spec.matrix(f.shape[1] - 1)
    stat = float(np.sum(w * m))
    var = float(np.sum(m[spec.random_rows] ** 2)) / f.shape[1]
    if var <= 0:
        return SignalResult(len(probes), dis, 0.0, 1.0, mode)
    z = stat / float(np.sqrt(var))
    return SignalResult(len(probes), dis, z, float(norm.sf(z)), mode)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`. ``watermark_present`` is ``p_value < alpha``."""

    model: str | None
    account: str | None
    entries: int
    cells: int
    matches: int
    match_rate: float
    chance_rate: float
    chance_method: str
    trials: int
    trial_probability: float
    p_value: float
    alpha: float
    watermark_present: bool
    references: list[ReferenceResult] = field(default_factory=list)
    marks_p_value: float | None = None
    """The p-value of the marks test alone (None when the ledger has no marks)."""
    signal: SignalResult | None = None
    """The signal test (None when the ledger has no signal watermark or too few probes)."""
    band: BandResult | None = None
    """The band test (None when the ledger has no band marks or band rows)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def render(self) -> str:
        who = self.account if self.account is not None else "all accounts"
        verdict = (
            "WATERMARK PRESENT: the suspect reproduces our watermark answers"
            if self.watermark_present
            else "no evidence of the watermark at this threshold"
        )
        lines = [
            f"Watermark verification: model {self.model or '(all)'}, ledger entries of {who}",
            "  marks (DAWN)",
            f"    entries replayed    {self.entries} ({self.cells} distinct cells)",
        ]
        if self.marks_p_value is not None:
            lines += [
                f"    matches             {self.matches} ({self.match_rate:.2%})",
                f"    chance rate         {self.chance_rate:.4%} ({self.chance_method})",
                f"    binomial test       k={self.matches} of n={self.trials}, "
                f"p0={self.trial_probability:.4g}",
                f"    p-value             {self.marks_p_value:.3g}",
            ]
        sig = self.signal
        lines.append("  signal (keyed tilt)")
        if sig is None:
            lines.append("    not tested (no signal watermark or too few boundary probes)")
        else:
            lines += [
                f"    probes replayed     {sig.probes} ({sig.disagreements} labelled "
                "differently from the original)",
                f"    compared            the suspect's {sig.mode}",
                f"    z (exact N(0,1) if innocent)  {sig.z:.2f}",
                f"    p-value             {sig.p_value:.3g}",
            ]
        b = self.band
        lines.append("  band marks (runner-up flips)")
        if b is None:
            lines.append("    not tested (no band marks in the ledger)")
        else:
            lines += [
                f"    band cells replayed {b.examined} (accounts pooled by top-1 fit: "
                f"{len(b.accounts)})",
                f"    runner-up answers   {b.runner_up}, {b.hits} of them band-marked "
                f"(exact Binomial({b.runner_up}, {b.rate:g}) if innocent)",
                f"    p-value             {b.p_value:.3g}",
                f"    e-value bound       {b.evalue_bound:.3g} (valid for adaptive queriers)",
            ]
        lines += [
            f"  p-value (one-sided, all tests, Bonferroni)  {self.p_value:.3g}  "
            f"(threshold {self.alpha:g})",
            f"  verdict               {verdict}",
        ]
        for i, r in enumerate(self.references):
            lines.append(f"  reference model {i + 1:<5} matches {r.matches}, p = {r.p_value:.3g}")
        return "\n".join(lines)


class _Recorded(Protocol):
    """What marks and probes share: a model, a cell digest and an input."""

    @property
    def model(self) -> str: ...
    @property
    def cell(self) -> str: ...
    @property
    def input(self) -> np.ndarray: ...


_R = TypeVar("_R", bound=_Recorded)


def _dedupe(entries: Sequence[_R]) -> list[_R]:
    """The first of each (model, cell), in order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in entries:
        key = (e.model, e.cell) if e.cell else (e.model, str(id(e)))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _stack_inputs(entries: Sequence[_Recorded]) -> np.ndarray:
    shapes = {e.input.shape for e in entries}
    if len(shapes) != 1:
        raise InputError(
            f"ledger inputs have several shapes {sorted(shapes)}; verify one model at a time"
        )
    return np.stack([e.input for e in entries])


def verify(
    ledger: WatermarkLedger,
    suspect: Predict,
    *,
    model: str | None = None,
    account: str | None = None,
    num_classes: int | None = None,
    original: Predict | None = None,
    controls: np.ndarray | None = None,
    references: Sequence[Predict] = (),
    alpha: float = DEFAULT_ALPHA,
    signal_probes: int = DEFAULT_SIGNAL_PROBES,
    band_pool: str = "fit",
) -> VerifyReport:
    """Replay the ledger (optionally one model's / one account's entries) to ``suspect``.

    ``num_classes`` is the class count of the watermarked model (default: inferred
    from the suspect's probability output, else the largest label seen + 1, which can
    only undercount and so only makes the test more conservative).
    ``original`` and ``controls`` are needed for score / two-class ledgers (see the
    module docstring). ``signal_probes`` caps the probes the signal test replays
    (the ones nearest a decision boundary first). ``band_pool`` says which accounts'
    band rows the band test pools: ``"fit"`` (those on which the suspect's top-1 fit is
    high, a coin-free choice; see :func:`~sealserve.defense.watermark.band.select_accounts`)
    or ``"all"`` (every account selected by ``account=``).

    Raises:
        InputError: no matching entries or probes, mixed models or input shapes, or a
            suspect output that is not one label per input.
        ConfigError: a score / two-class ledger without ``original`` and ``controls``,
            ``alpha`` outside (0, 1), ``signal_probes`` < 1 or an unknown ``band_pool``.
    """
    if band_pool not in ("fit", "all"):
        raise ConfigError(f"band_pool must be 'fit' or 'all', got {band_pool!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if signal_probes < 1:
        raise ConfigError(f"signal_probes must be >= 1, got {signal_probes!r}")
    all_entries = ledger.entries(account=account, model=model)
    all_probes = ledger.probes(account=account, model=model)
    all_band = ledger.band_rows(account=account, model=model)
    models = (
        {e.model for e in all_entries} | {p.model for p in all_probes} | {r.model for r in all_band}
    )
    if not models:
        raise InputError("the ledger holds no watermark entries for this model/account")
    if len(models) > 1:
        raise InputError(f"the ledger mixes models {sorted(models)}; choose one with model=")
    name = next(iter(models))
    spec = ledger.signal(name)
    band_spec = ledger.band(name)
    if band_spec is None:
        all_band = []
    # ledger.probes() lists nearest the boundary first; keep one per cell.
    probes = _dedupe(all_probes)[:signal_probes] if spec is not None else []
    if len(probes) < MIN_SIGNAL_PROBES:
        probes = []
    if not all_entries and not probes and not all_band:
        raise InputError("the ledger holds no watermark entries for this model/account")
    signal: SignalResult | None = None
    ref_signal: list[float] = []
    if probes:
        assert spec is not None
        x = _stack_inputs(probes)
        signal = signal_test(spec, probes, np.asarray(suspect(x)))
        ref_signal = [signal_test(spec, probes, np.asarray(r(x))).p_value for r in references]
    band: BandResult | None = None
    ref_band: list[float] = []
    if all_band:
        assert band_spec is not None

        def labels(raw: np.ndarray) -> np.ndarray:
            return to_labels(raw, kind="class")

        pool = band_pool == "fit"
        band = band_test(band_spec, all_band, suspect, to_labels=labels, pool=pool)
        ref_band = [
            band_test(band_spec, all_band, r, to_labels=labels, pool=pool).p_value
            for r in references
        ]
    marks = (
        _marks_test(all_entries, suspect, num_classes, original, controls, references)
        if all_entries
        else None
    )
    tests = sum(t is not None for t in (marks, signal, band))

    def combine(*ps: float | None) -> float:
        return float(min(1.0, tests * min(p for p in ps if p is not None)))

    p = combine(
        marks.p_value if marks is not None else None,
        signal.p_value if signal is not None else None,
        band.p_value if band is not None else None,
    )
    n_refs = len(references)
    ref_marks = marks.references if marks is not None else [(0, None)] * n_refs
    refs = [
        ReferenceResult(
            hits,
            combine(rp, ref_signal[i] if ref_signal else None, ref_band[i] if ref_band else None),
        )
        for i, (hits, rp) in enumerate(ref_marks)
    ]
    if marks is None:
        return VerifyReport(
            model=name, account=account, entries=0, cells=0, matches=0, match_rate=0.0,
            chance_rate=0.0, chance_method="no marks in the ledger", trials=0,
            trial_probability=0.0, p_value=p, alpha=alpha,
            watermark_present=bool(p < alpha), references=refs,
            marks_p_value=None, signal=signal, band=band,
        )  # fmt: skip
    return VerifyReport(
        model=name,
        account=account,
        entries=len(all_entries),
        cells=marks.cells,
        matches=marks.matches,
        match_rate=marks.matches / marks.cells,
        chance_rate=marks.chance,
        chance_method=marks.method,
        trials=marks.trials,
        trial_probability=marks.p0,
        p_value=p,
        alpha=alpha,
        watermark_present=bool(p < alpha),
        references=refs,
        marks_p_value=marks.p_value,
        signal=signal,
        band=band,
    )


@dataclass(frozen=True)
class _Marks:
    cells: int
    matches: int
    trials: int
    p0: float
    chance: float
    method: str
    p_value: float
    references: Sequence[tuple[int, float | None]]


def _marks_test(
    all_entries: Sequence[LedgerEntry],
    suspect: Predict,
    num_classes: int | None,
    original: Predict | None,
    controls: np.ndarray | None,
    references: Sequence[Predict],
) -> _Marks:
    """The DAWN marks test (module docstring): key randomisation or controls."""
    entries = _dedupe(all_entries)
    kind, threshold = entries[0].kind, entries[0].threshold
    inputs = _stack_inputs(entries)
    wm = np.array([e.label for e in entries], dtype=np.int64)
    orig = np.array([e.original for e in entries], dtype=np.int64)
    raw = np.asarray(suspect(inputs))
    labels = predict_labels(lambda _: raw, inputs, kind, threshold)
    if num_classes is None:
        num_classes = (
            raw.shape[1]
            if raw.ndim == 2 and raw.shape[1] > 1
            else max(int(wm.max()), int(orig.max()), int(labels.max())) + 1
        )
    n = len(entries)
    k = int(np.sum(labels == wm))

    def test(lab: np.ndarray, p0: float | None) -> tuple[int, int, float, float]:
        hits = int(np.sum(lab == wm))
        if p0 is None:  # key randomisation
            trials, p = int(np.sum(lab != orig)), 1.0 / (num_classes - 1)
        else:
            trials, p = n, p0
        pv = float(binomtest(hits, trials, p, alternative="greater").pvalue) if trials else 1.0
        return hits, trials, p, pv

    if kind == "class" and num_classes >= 3:
        method = "key randomisation: 1/(C-1) on cells where the suspect leaves the top-1"
        _, trials, p0, pv = test(labels, None)
        chance = trials * p0 / n
        ref_p0: float | None = None
    else:
        if original is None or controls is None or len(controls) == 0:
            raise ConfigError(
                "a score or two-class watermark has no key randomness in its label; give "
                "original= and controls= (unmarked natural inputs) to estimate the chance rate"
            )
        o = predict_labels(original, controls, kind, threshold)
        s = predict_labels(suspect, controls, kind, threshold)
        dis = int(np.sum(o != s))
        ci = binomtest(dis, len(controls)).proportion_ci(_CONTROL_CONFIDENCE, method="exact")
        chance = float(min(max(ci.high, 1.0 / (len(controls) + 1)), 1.0))
        method = (
            f"suspect/original disagreement on {len(controls)} controls, "
            f"{_CONTROL_CONFIDENCE:.0%} upper bound"
        )
        _, trials, p0, pv = test(labels, chance)
        ref_p0 = chance
    refs = []
    for ref in references:
        rl = predict_labels(ref, inputs, kind, threshold)
        hits, _, _, rpv = test(rl, ref_p0)
        refs.append((hits, rpv))
    return _Marks(n, k, trials, float(p0), float(chance), method, pv, refs)
