"""Output perturbation and watermark on the demo task (scikit-learn digits).

Prints, as Markdown:
1. per transform: honest utility on the held-out test set (top-1 agreement with the
   unperturbed model, mean |dp|) and the fidelity of a replica trained on 10,000
   answers by a soft-label thief (distils probabilities when returned, else labels);
2. watermark power: replicas trained on the defended answers, and independently
   trained models, through the verifier;
3. the spread of honest utility over 200 random watermark keys;
4. CPU microseconds per batch-1 request of the whole transform + watermark step.

Run: PYTHONPATH=$PWD python bench/bench_defense_outputs.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from threadpoolctl import threadpool_limits

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.perturb import Profile, Release
from sealserve.defense.watermark import WatermarkLedger
from sealserve.defense.watermark_verify import verify
from tests.defense import digits_task as dt

PROFILES: dict[str, dict[str, Any]] = {
    "none (raw probabilities)": {},
    "round 2": {"round": 2},
    "round 1": {"round": 1},
    "top-3 zero": {"top_k": {"k": 3, "mode": "zero"}},
    "top-1 zero": {"top_k": 1},
    "keyed gaussian 0.05 + top-1 kept": {
        "noise": {"dist": "gaussian", "scale": 0.05},
        "preserve_top1": True,
        "renormalise": True,
    },
    "keyed laplace 0.2 + top-1 kept": {
        "noise": {"dist": "laplace", "scale": 0.2},
        "preserve_top1": True,
        "renormalise": True,
    },
    "reverse sigmoid b=0.7 g=0.4": {"reverse_sigmoid": {"beta": 0.7, "gamma": 0.4}},
    "reverse sigmoid b=0.7 g=0.4 + top-1 kept": {
        "reverse_sigmoid": {"beta": 0.7, "gamma": 0.4},
        "preserve_top1": True,
    },
    "label only": {"label_only": True},
    "DEFAULT (laplace 0.02, top-1 kept, round 3, watermark 0.2%)": "default",  # type: ignore[dict-item]
}


def fidelity_table(task: dt.Digits, queries: np.ndarray, iters: int) -> list[str]:
    rows = [
        "| profile | honest top-1 agreement | mean abs dp | replica fidelity: soft thief "
        "| replica fidelity: argmax-label thief |",
        "|---|---|---|---|---|",
    ]
    clean_test = task.proba(task.x_test)
    truth = np.argmax(clean_test, 1)
    answers = task.proba(queries)
    for name, mapping in PROFILES.items():
        prof = (
            dt.default_profile()
            if mapping == "default"
            else Profile.from_mapping(name, {"coarsen": dt.COARSEN, **mapping}, output=dt.SPEC)
        )
        bound = prof.bind(key=dt.KEY, ledger=WatermarkLedger())
        honest = bound.apply_at_time(clean_test, inputs=task.x_test, account="h", model="d", now=0)
        soft = dt.soft_targets(honest)
        agree = float(np.mean(_labels(honest) == truth))
        dp = "-" if soft is None else f"{np.mean(np.abs(soft - clean_test)):.4f}"
        rel = bound.apply_at_time(answers, inputs=queries, account="t", model="d", now=0)
        thief = dt.train_thief(queries, rel, iters=iters)
        fid = float(np.mean(thief.predict(task.x_test / 16.0) == truth))
        as_labels = Release(_labels(rel), rel.marked, form="label")
        lab_thief = dt.train_thief(queries, as_labels, iters=iters)
        fid_lab = float(np.mean(lab_thief.predict(task.x_test / 16.0) == truth))
        rows.append(f"| {name} | {agree:.2%} | {dp} | {fid:.2%} | {fid_lab:.2%} |")
    return rows


def _labels(r: Release) -> np.ndarray:
    if r.form == "label":
        return np.asarray(r.values)
    if r.form == "top_k":
        assert r.indices is not None
        return r.indices[:, 0]
    return np.argmax(r.values, 1)


def power_table(task: dt.Digits, queries: np.ndarray) -> list[str]:
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    ledger = WatermarkLedger()
    bound = dt.default_profile().bind(key=dt.KEY, ledger=ledger)
    rel = bound.apply_at_time(task.proba(queries), inputs=queries, account="t", model="d", now=0)
    labels = np.argmax(rel.values, 1)
    rows = [
        f"Ledger: {len(ledger)} marked answers out of {len(queries)} queries.",
        "",
        "| model | matches / cells | chance rate | p-value | verdict |",
        "|---|---|---|---|---|",
    ]
    models: list[tuple[str, Any, np.ndarray, np.ndarray]] = [
        ("replica LogisticRegression", LogisticRegression(max_iter=300, C=10.0), queries, labels),
        (
            "replica MLP (128)",
            MLPClassifier(hidden_layer_sizes=(128,), max_iter=120, random_state=1),
            queries,
            labels,
        ),
        ("replica ExtraTrees (40)", ExtraTreesClassifier(40, random_state=0), queries, labels),
        ("replica RandomForest (40)", RandomForestClassifier(40, random_state=0), queries, labels),
        (
            "independent MLP (true labels)",
            MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=5),
            task.x_owner,
            task.y_owner,
        ),
        (
            "independent ExtraTrees (true labels)",
            ExtraTreesClassifier(40, random_state=5),
            task.x_owner,
            task.y_owner,
        ),
    ]
    for name, model, x, y in models:
        model.fit(x, y)
        rep = verify(ledger, model.predict, num_classes=10)
        rows.append(
            f"| {name} | {rep.matches}/{rep.cells} | {rep.chance_rate:.4f} | "
            f"{rep.p_value:.2g} | {'PRESENT' if rep.watermark_present else 'no claim'} |"
        )
    return rows


def key_spread(task: dt.Digits, keys: int) -> list[str]:
    clean = task.proba(task.x_test)
    truth = np.argmax(clean, 1)
    prof = dt.default_profile()
    agree = []
    for i in range(keys):
        b = prof.bind(key=i.to_bytes(32, "big"), ledger=WatermarkLedger())
        r = b.apply_at_time(clean, inputs=task.x_test, account="h", model="d", now=0)
        agree.append(float(np.mean(np.argmax(r.values, 1) == truth)))
    a = np.array(agree)
    return [
        f"Honest top-1 agreement over {keys} random keys (450 test inputs): "
        f"mean {a.mean():.4%}, min {a.min():.4%}, share of keys >= 99.5%: "
        f"{np.mean(a >= 0.995):.1%}"
    ]


def cpu_cost(n: int) -> list[str]:
    rows = ["| profile | CPU us / batch-1 request |", "|---|---|"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (1, 64)).astype(np.float32)
    p = rng.dirichlet(np.ones(10), 1).astype(np.float32)
    heavy = {
        "coarsen": dt.COARSEN,
        "noise": {"dist": "gaussian", "scale": 0.05},
        "reverse_sigmoid": {"beta": 0.7, "gamma": 0.4},
        "renormalise": True,
        "preserve_top1": True,
        "top_k": 3,
        "round": 2,
        "watermark": True,
    }
    score = Profile.default(OutputSpec.score(), coarsen=dt.COARSEN)
    cases = [
        ("default", dt.default_profile(), p),
        ("all transforms", Profile.from_mapping("heavy", heavy, output=dt.SPEC), p),
        ("default, score output", score, np.array([[0.3]], dtype=np.float32)),
    ]
    for name, prof, out in cases:
        b = prof.bind(key=dt.KEY, ledger=WatermarkLedger())
        for _ in range(2000):
            b.apply_at_time(out, inputs=x, account="acct-1", model="digits", now=0.0)
        t = time.process_time()
        for _ in range(n):
            b.apply_at_time(out, inputs=x, account="acct-1", model="digits", now=0.0)
        rows.append(f"| {name} | {(time.process_time() - t) / n * 1e6:.1f} |")
    # Reference operations, to scale the figures to a quieter machine.
    import hmac

    t = time.process_time()
    for _ in range(n):
        hmac.digest(dt.KEY, b"x" * 520, "sha256")
    rows.append(
        f"| (reference: one HMAC-SHA256 of 520 bytes) | {(time.process_time() - t) / n * 1e6:.1f} |"
    )
    t = time.process_time()
    for _ in range(n):
        p.argmax(axis=1)
    rows.append(
        f"| (reference: one numpy argmax of 1x10) | {(time.process_time() - t) / n * 1e6:.2f} |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations and keys")
    args = ap.parse_args()
    with threadpool_limits(limits=1):
        task = dt.load()
        queries = dt.augment(task.x_pool, 10_000, seed=3)
        print("## Utility and replica fidelity (10,000 queries, soft-label thief)\n")
        print("\n".join(fidelity_table(task, queries, 30 if args.quick else 80)))
        print("\n## Watermark power (default profile)\n")
        print("\n".join(power_table(task, queries)))
        print()
        print("\n".join(key_spread(task, 50 if args.quick else 200)))
        print("\n## CPU cost of the transform + watermark step\n")
        print("\n".join(cpu_cost(5_000 if args.quick else 30_000)))
        print(f"\n(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
