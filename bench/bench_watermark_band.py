"""Band marks (issue 16, item 3b): the watermark power table on the demo task.

Prints, as Markdown:
1. power: a thief sends natural (augmented) digits to the default profile + band marks
   (margin 0.3, rate 0.05), as 1 or 10 accounts, and trains label-only or probability
   replicas on 500 / 1,000 / 5,000 answers; each replica goes through the full
   ``verify`` (DAWN marks, signal, band: the band p, the Bonferroni-combined p, the
   anytime-valid e-value bound);
2. the 1,000-answer thief as 10 accounts hidden among 40 honest accounts (pooled by the
   suspect's top-1 fit);
3. false claims: >= 20 models that never saw a band-marked answer x 200 keys x 2 recorded
   streams, exact band test;
4. honest top-1 agreement over 200 keys (held-out digits and augmented ones);
5. CPU microseconds per batch-1 request, default profile with and without band marks.

Run: PYTHONPATH=$PWD python bench/bench_watermark_band.py [--quick]
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from scipy.stats import binom
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.band import BandSpec, band_test, evalue_bound
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.verify import to_labels, verify
from tests.defense import digits_task as dt

BAND = {"margin": 0.3, "rate": 0.05}
FRACTION = 0.002
THIEF = "augmented"
Suspect = Callable[[np.ndarray], np.ndarray]


def profile(band: bool) -> Profile:
    wm: dict[str, Any] = {"fraction": FRACTION}
    if band:
        wm["band"] = BAND
    return dt.default_profile(watermark=wm)


def key_of(i: int) -> bytes:
    return hmac.digest(b"bench-band-keys!", i.to_bytes(4, "big"), "sha256")


def serve(
    task: dt.Digits,
    q: np.ndarray,
    accounts: list[str],
    ledger: WatermarkLedger,
    *,
    key: bytes = dt.KEY,
) -> np.ndarray:
    """Released probabilities of ``q``, split in order over ``accounts``."""
    bound = profile(True).bind(key=key, ledger=ledger)
    p = task.proba(q)
    out = np.empty_like(p)
    for acct, idx in zip(accounts, np.array_split(np.arange(len(q)), len(accounts)), strict=True):
        out[idx] = bound.apply_at_time(
            p[idx], inputs=q[idx], account=acct, model="digits", now=0.0
        ).values
    return out


def thief_queries(task: dt.Digits, n: int, seed: int) -> np.ndarray:
    """The thief's ``n`` queries: augmented pool digits, or (``--thief natural``) the
    public digits outside the held-out set as they are (what honest users send)."""
    if THIEF == "natural":
        from theft.blend_in import natural_digits

        return natural_digits(n, exclude=task.x_test, seed=seed).astype(np.float64)
    return dt.augment(task.x_pool, n, seed=seed)


def label_replica(name: str, x: np.ndarray, y: np.ndarray) -> Suspect:
    m: Any = {
        "LR": lambda: LogisticRegression(C=10, max_iter=2000),
        "MLP": lambda: MLPClassifier((64,), max_iter=300, random_state=0),
        "RF": lambda: RandomForestClassifier(100, random_state=0),
        "1NN": lambda: KNeighborsClassifier(1),
        "5NN": lambda: KNeighborsClassifier(5),
    }[name]()
    m.fit(x / 16.0, y)
    return lambda z: np.asarray(m.predict_proba(z / 16.0))


def prob_replica(name: str, x: np.ndarray, soft: np.ndarray) -> Suspect:
    if name == "LR":
        m: Any = dt.soft_logistic(x / 16.0, soft)
        return lambda z: np.asarray(m.predict_proba(z / 16.0))
    m = {
        "RF": lambda: RandomForestRegressor(100, random_state=0),
        "1NN": lambda: KNeighborsRegressor(1),
        "5NN": lambda: KNeighborsRegressor(5),
    }[name]()
    m.fit(x / 16.0, soft)

    def out(z: np.ndarray) -> np.ndarray:
        p = np.clip(m.predict(z / 16.0), 1e-6, None)
        return np.asarray(p / p.sum(1, keepdims=True))

    return out


def fmt(p: float) -> str:
    return f"{p:.1g}" if p < 1e-3 else f"{p:.2g}"


def power(task: dt.Digits, sizes: list[int]) -> list[str]:
    lines = [
        "| accounts | reads | replica | answers | band rows recorded | k / \\|D\\| | band p "
        "| all tests (Bonferroni) p | e-value bound | verdict at 1e-6 | fidelity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    y_test = task.labels(task.x_test)
    for n in sizes:
        q = thief_queries(task, n, 3)
        for n_acc in (1, 10):
            ledger = WatermarkLedger()
            released = serve(task, q, [f"thief{i}" for i in range(n_acc)], ledger)
            y = released.argmax(1)
            cases = [("labels", r) for r in ("LR", "MLP", "RF", "1NN", "5NN")]
            cases += [("probs", r) for r in ("LR", "RF", "1NN", "5NN")]
            for reads, name in cases:
                suspect = (
                    label_replica(name, q, y)
                    if reads == "labels"
                    else prob_replica(name, q, released)
                )
                # The thief's accounts are known here (linked by detection): pool them all.
                rep = verify(ledger, suspect, model="digits", band_pool="all")
                b = rep.band
                assert b is not None
                fid = float(np.mean(to_labels(suspect(task.x_test)) == y_test))
                verdict = "PROVEN" if rep.p_value < 1e-6 else "no"
                lines.append(
                    f"| {n_acc} | {reads} | {name} | {n:,} | {len(ledger.band_rows())} | "
                    f"{b.hits} / {b.runner_up} | {fmt(b.p_value)} | {fmt(rep.p_value)} | "
                    f"{fmt(b.evalue_bound)} | {verdict} | {fid:.3f} |"
                )
                print(lines[-1], file=sys.stderr)
    return lines


def power_many(task: dt.Digits, sizes: list[int], seeds: int) -> list[str]:
    """Power over ``seeds`` independent thief streams (and keys) per cell: the share of
    replicas proven (all tests, Bonferroni, p < 1e-6), the median p and the median
    number of band-marked answers the thief received."""
    lines = [
        "| accounts | reads | replica | answers | proven (p < 1e-6) | proven at p < 1e-3 "
        "| median p | band-marked answers received: median (min-max) | median fidelity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    y_test = task.labels(task.x_test)
    cases = [("labels", r) for r in ("LR", "MLP", "RF", "1NN", "5NN")]
    cases += [("probs", r) for r in ("LR", "RF", "1NN", "5NN")]
    for n in sizes:
        for n_acc in (1, 10):
            res: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in cases}
            marked: list[int] = []
            for s in range(seeds):
                q = thief_queries(task, n, 100 + s)
                ledger = WatermarkLedger()
                released = serve(task, q, [f"thief{i}" for i in range(n_acc)], ledger,
                                 key=key_of(1000 + s))  # fmt: skip
                y = released.argmax(1)
                spec = ledger.band("digits")
                assert spec is not None
                rows = ledger.band_rows()
                cells = list({r.cell: r for r in rows}.values())
                coins = spec.coins([r.cell for r in cells])
                flipped = [r for r, c in zip(cells, coins, strict=True) if c]
                marked.append(len(flipped))
                for reads, name in cases:
                    suspect = (
                        label_replica(name, q, y)
                        if reads == "labels"
                        else prob_replica(name, q, released)
                    )
                    rep = verify(ledger, suspect, model="digits", band_pool="all")
                    fid = float(np.mean(to_labels(suspect(task.x_test)) == y_test))
                    res[(reads, name)].append((rep.p_value, fid))
            for (reads, name), r in res.items():
                ps = np.array([p for p, _ in r])
                fids = np.array([f for _, f in r])
                lines.append(
                    f"| {n_acc} | {reads} | {name} | {n:,} | {int(np.sum(ps < 1e-6))} / {seeds} "
                    f"| {int(np.sum(ps < 1e-3))} / {seeds} | {fmt(float(np.median(ps)))} | "
                    f"{int(np.median(marked))} ({min(marked)}-{max(marked)}) | "
                    f"{np.median(fids):.3f} |"
                )
                print(lines[-1], file=sys.stderr)
    return lines


def hidden(task: dt.Digits) -> list[str]:
    q = thief_queries(task, 1000, 3)
    honest = dt.augment(task.x_test, 4000, seed=11)
    ledger = WatermarkLedger()
    released = serve(task, q, [f"thief{i}" for i in range(10)], ledger)
    serve(task, honest, [f"honest{i}" for i in range(40)], ledger)
    y = released.argmax(1)
    rows = ledger.band_rows()
    spec = ledger.band("digits")
    assert spec is not None
    lines = [
        "| reads | replica | all 50 accounts pooled: k / \\|D\\|, p | accounts picked by "
        "top-1 fit (thief / honest) | picked: k / \\|D\\|, p |",
        "|---|---|---|---|---|",
    ]
    cases = [("labels", r, label_replica(r, q, y)) for r in ("LR", "MLP", "RF", "1NN", "5NN")]
    for reads, name, suspect in cases:
        everyone = band_test(spec, rows, suspect, to_labels=to_labels, pool=False)
        picked = band_test(spec, rows, suspect, to_labels=to_labels)
        thief = sum(a.startswith("thief") for a in picked.accounts)
        lines.append(
            f"| {reads} | {name} | {everyone.hits} / {everyone.runner_up}, "
            f"{fmt(everyone.p_value)} | {thief} / {len(picked.accounts) - thief} | "
            f"{picked.hits} / {picked.runner_up}, {fmt(picked.p_value)} |"
        )
    return lines


def innocents(task: dt.Digits) -> list[tuple[str, Any]]:
    """22 models that never saw a band-marked answer."""
    xo, yo = task.x_owner / 16.0, task.y_owner
    rng = np.random.default_rng(7)
    fams: list[tuple[str, Callable[[int], Any]]] = [
        ("LR", lambda s: LogisticRegression(C=1.0, max_iter=500)),
        ("MLP64", lambda s: MLPClassifier((64,), max_iter=200, random_state=s)),
        ("MLP128", lambda s: MLPClassifier((128,), max_iter=200, random_state=s)),
        ("RF", lambda s: RandomForestClassifier(50, random_state=s)),
        ("ET", lambda s: ExtraTreesClassifier(50, random_state=s)),
        ("1NN", lambda s: KNeighborsClassifier(1)),
        ("5NN", lambda s: KNeighborsClassifier(5)),
        ("SVC", lambda s: SVC()),
        ("NB", lambda s: GaussianNB()),
    ]
    out = []
    for i, (name, make) in enumerate(fams):  # on 700-digit subsets of the owner's data
        idx = rng.choice(len(xo), 700, replace=False)
        out.append((f"{name} (true labels)", make(i).fit(xo[idx], yo[idx])))
    # Replicas of the UNDEFENDED model: the hardest innocents (same boundaries as ours).
    xa = dt.augment(task.x_pool, 2000, seed=21)
    ya = task.labels(xa)
    for i, (name, make) in enumerate(fams[:8]):
        out.append((f"{name} (undefended replica)", make(100 + i).fit(xa / 16.0, ya)))
    # Replicas of another defended deployment (another key).
    other = profile(True).bind(key=b"another-deployment-key!!", ledger=WatermarkLedger())
    yo2 = other.apply_at_time(task.proba(xa), inputs=xa, account="o", model="digits",
                              now=0.0).values.argmax(1)  # fmt: skip
    for i, (name, make) in enumerate(fams[:5]):
        out.append((f"{name} (other deployment)", make(200 + i).fit(xa / 16.0, yo2)))
    return out


def null(task: dt.Digits, keys: int) -> list[str]:
    streams = []
    for n in (1000, 5000):
        ledger = WatermarkLedger()
        serve(task, thief_queries(task, n, 3), ["t"], ledger)
        streams.append(ledger.band_rows())
    models = innocents(task)
    ps: list[float] = []
    per_model: dict[str, list[float]] = {}
    ev: list[float] = []
    for name, m in models:
        for rows in streams:
            x = np.stack([r.input for r in rows]).astype(np.float64)
            lab = m.predict(x / 16.0)
            top2 = np.array([r.top2 for r in rows])
            d_cells = [r.cell for r, ok in zip(rows, lab == top2, strict=True) if ok]
            for k in range(keys):
                spec = BandSpec("digits", key_of(k), BAND["margin"], BAND["rate"])
                # The same exact test as band_test (rows are already one per cell).
                hits = int(spec.coins(d_cells).sum())
                p = float(binom.sf(hits - 1, len(d_cells), spec.rate)) if hits else 1.0
                ps.append(p)
                per_model.setdefault(name, []).append(p)
                ev.append(evalue_bound(hits, len(d_cells), spec.rate))
    a = np.array(ps)
    worst = max(per_model.items(), key=lambda kv: np.mean(np.array(kv[1]) <= 0.01))
    lines = [
        f"{len(models)} models x {keys} keys x 2 streams (band rows of a 1,000- and a "
        f"5,000-query thief: {len(streams[0])} and {len(streams[1])} cells) = {len(a):,} "
        "exact tests.",
        "",
        "| threshold a | share of innocent tests with p <= a (an exact test allows <= a) |",
        "|---|---|",
    ]
    for t in (0.1, 0.05, 0.01, 0.001, 1e-4, 1e-6):
        lines.append(f"| {t:g} | {np.mean(a <= t):.2%} ({int(np.sum(a <= t))}) |")
    lines += [
        "",
        f"Smallest p: {a.min():.2g}. Worst model at a = 0.01: {worst[0]}, "
        f"{np.mean(np.array(worst[1]) <= 0.01):.2%} of its {len(worst[1])} tests. "
        f"Smallest anytime-valid e-value bound: {min(ev):.2g}.",
    ]
    return lines


def honest(task: dt.Digits, keys: int) -> list[str]:
    lines = [
        "| data | default profile alone: mean (min) | + band marks: mean (min) | keys >= 99.5% "
        "(alone / + band) | repo test key (dt.KEY): alone / + band |",
        "|---|---|---|---|---|",
    ]
    sets = (("450 held-out digits", task.x_test),
            ("2,000 augmented held-out digits", dt.augment(task.x_test, 2000, seed=9)))  # fmt: skip
    for name, x in sets:
        clean = task.proba(x)
        want = clean.argmax(1)
        res = {}
        for band in (False, True):
            prof = profile(band)
            ag = []
            for k in range(keys + 1):
                key = dt.KEY if k == keys else key_of(k)
                r = prof.bind(key=key, ledger=WatermarkLedger()).apply_at_time(
                    clean, inputs=x, account="h", model="digits", now=0.0
                )
                ag.append(float(np.mean(r.values.argmax(1) == want)))
            res[band] = (np.array(ag[:-1]), ag[-1])
        a0, k0 = res[False]
        a1, k1 = res[True]
        lines.append(
            f"| {name} | {a0.mean():.2%} ({a0.min():.2%}) | {a1.mean():.2%} ({a1.min():.2%}) | "
            f"{np.mean(a0 >= 0.995):.1%} / {np.mean(a1 >= 0.995):.1%} | {k0:.2%} / {k1:.2%} |"
        )
    return lines


def cpu(task: dt.Digits, rounds: int) -> list[str]:
    q = dt.augment(task.x_pool, 400, seed=4)
    p = task.proba(q)
    bounds = {b: profile(b).bind(key=dt.KEY, ledger=WatermarkLedger()) for b in (False, True)}
    best = {False: np.inf, True: np.inf}
    for r in range(rounds):  # interleaved, alternating order: the machine is noisy
        for b in (False, True) if r % 2 else (True, False):
            bound = bounds[b]
            t = time.process_time()
            for i in range(len(q)):
                bound.apply_at_time(p[i : i + 1], inputs=q[i : i + 1], account="a",
                                    model="digits", now=0.0)  # fmt: skip
            best[b] = min(best[b], (time.process_time() - t) / len(q) * 1e6)
    return [
        "| profile | CPU us / batch-1 request (best of rounds, augmented inputs) |",
        "|---|---|",
        f"| default | {best[False]:.1f} |",
        f"| default + band marks | {best[True]:.1f} |",
    ]


def main() -> None:
    global THIEF, FRACTION
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--margin", type=float, default=BAND["margin"], help="band margin")
    ap.add_argument("--rate", type=float, default=BAND["rate"], help="band coin rate")
    ap.add_argument("--fraction", type=float, default=FRACTION, help="DAWN mark fraction")
    ap.add_argument("--thief", choices=("augmented", "natural"), default=THIEF)
    ap.add_argument(
        "--seeds", type=int, default=1,
        help="thief streams per power cell (> 1: a power-share table instead of one stream)",
    )  # fmt: skip
    ap.add_argument("--sizes", default="", help="answers per thief, comma-separated")
    args = ap.parse_args()
    BAND.update(margin=args.margin, rate=args.rate)
    FRACTION, THIEF = args.fraction, args.thief
    warnings.filterwarnings("ignore")
    with threadpool_limits(1):
        task = dt.load()
        sizes = [500, 1000] if args.quick else [500, 1000, 5000]
        if args.sizes:
            sizes = [int(v) for v in args.sizes.split(",")]
        keys = 20 if args.quick else 200
        prof = (
            f"DAWN fraction {FRACTION:g} + band marks, margin {BAND['margin']:g}, "
            f"rate {BAND['rate']:g}; {THIEF} thief"
        )
        out = [f"### Power ({prof})", ""]
        if args.seeds > 1:
            out += [
                f"{args.seeds} thief streams per cell, each with its own key; replicas answer "
                "probabilities to `verify` (the band test reads their argmax). Proven = all "
                "tests (Bonferroni) p < 1e-6.",
                "",
            ]
            out += power_many(task, sizes, args.seeds)
        else:
            out += [
                "One thief stream per cell (seed 3); replicas answer probabilities to "
                "`verify` (the band test reads their argmax). Proven = all tests "
                "(Bonferroni) p < 1e-6.",
                "",
            ]
            out += power(task, sizes)
        out += ["", "### The 1,000-answer thief as 10 accounts among 40 honest ones", ""]
        out += hidden(task)
        out += ["", "### False claims (exact null)", ""]
        out += null(task, keys)
        out += ["", f"### Honest top-1 agreement over {keys} keys", ""]
        out += honest(task, keys)
        out += ["", "### CPU", ""]
        out += cpu(task, 4 if args.quick else 15)
    load = os.getloadavg()[0]
    out += ["", f"(2-core dev machine, shared; load average at the end: {load:.2f})"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
