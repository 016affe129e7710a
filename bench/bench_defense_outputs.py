"""Output perturbation and watermark on the demo task (scikit-learn digits).

Prints, as Markdown:
1. per transform: honest utility on the held-out test set (top-1 agreement with the
   unperturbed model, mean |dp|) and the fidelity of a replica trained on 10,000
   answers by a soft-label thief (distils probabilities when returned, else labels);
2. watermark power: replicas trained on the defended answers, and independently
   trained models, through the verifier;
3. the spread of honest utility over 200 random watermark keys;
4. CPU microseconds per batch-1 request of the whole transform + watermark step, on
   the demo model's own answers, best of several interleaved rounds.

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
from sealserve.defense.release.hot_path import Release
from sealserve.defense.release.profile import Profile
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.verify import verify
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
    "DEFAULT without the signal tilt": "default-nosignal",  # type: ignore[dict-item]
    "DEFAULT (laplace 0.02, top-1 kept, round 3, watermark 0.2% + signal 3)": "default",  # type: ignore[dict-item]
}


def _profile(name: str, mapping: Any) -> Profile:
    if mapping == "default":
        return dt.default_profile()
    if mapping == "default-nosignal":
        return dt.default_profile(watermark={"signal": 0})
    return Profile.from_mapping(name, {"coarsen": dt.COARSEN, **mapping}, output=dt.SPEC)


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
        prof = _profile(name, mapping)
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
        f"Ledger: {len(ledger)} marked answers and {len(ledger.probes())} boundary probes "
        f"out of {len(queries)} queries. Suspects answer with probabilities (as an ONNX "
        "export or an OIP endpoint would). p-value = min(1, 2 min(marks, signal)).",
        "",
        "| model | trained on | marks: matches / cells | marks p | signal z | combined p "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    x16 = queries / 16.0
    models: list[tuple[str, str, Any]] = [
        ("replica LogisticRegression", "probabilities",
         dt.soft_logistic(x16, np.asarray(rel.values))),
        ("replica LogisticRegression", "labels",
         LogisticRegression(max_iter=1000, C=10.0).fit(x16, labels)),
        ("replica MLP (64), distilled", "probabilities",
         _Distilled(dt.train_thief(queries, rel).reg)),
        ("replica MLP (128), raw 0-16 inputs", "labels",
         _Raw(MLPClassifier((128,), max_iter=120, random_state=1).fit(queries, labels))),
        ("replica MLP (128)", "labels",
         MLPClassifier((128,), max_iter=120, random_state=1).fit(x16, labels)),
        ("replica ExtraTrees (40)", "labels",
         ExtraTreesClassifier(40, random_state=0).fit(x16, labels)),
        ("replica RandomForest (40)", "labels",
         RandomForestClassifier(40, random_state=0).fit(x16, labels)),
        ("independent MLP", "true labels",
         MLPClassifier((64,), max_iter=200, random_state=5).fit(task.x_owner / 16.0, task.y_owner)),
        ("independent ExtraTrees", "true labels",
         ExtraTreesClassifier(40, random_state=5).fit(task.x_owner / 16.0, task.y_owner)),
        ("independent LogisticRegression", "true labels",
         LogisticRegression(max_iter=1000).fit(task.x_owner / 16.0, task.y_owner)),
    ]  # fmt: skip
    for name, data, model in models:
        rep = verify(ledger, lambda x, m=model: m.predict_proba(x / 16.0), num_classes=10)
        sig = rep.signal
        z = "-" if sig is None else f"{sig.z:.2f}"
        mp = "-" if rep.marks_p_value is None else f"{rep.marks_p_value:.2g}"
        rows.append(
            f"| {name} | {data} | {rep.matches}/{rep.cells} | {mp} | {z} | {rep.p_value:.2g} "
            f"| {'PRESENT' if rep.watermark_present else 'no claim'} |"
        )
    return rows


class _Distilled:
    """A regressor of the probabilities, answering as a softmax model would."""

    def __init__(self, reg: Any) -> None:
        self.reg = reg

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = np.clip(self.reg.predict(x), 1e-4, None)
        return np.asarray(out / out.sum(axis=1, keepdims=True))


class _Raw:
    """A model fitted on the raw 0-16 features (the verifier feeds x / 16)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x * 16.0))


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


def cpu_cost(task: dt.Digits, rounds: int) -> list[str]:
    """Process CPU per batch-of-one request on the demo model's own answers (2,000
    noisy test images, each request a different input), best of ``rounds`` rounds,
    the profiles interleaved so that they see the same machine load."""
    import hmac

    x = dt.augment(task.x_test, 2000, seed=5)
    p = task.proba(x).astype(np.float32)
    xs = [x[i : i + 1] for i in range(len(x))]
    ps = [p[i : i + 1] for i in range(len(x))]
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
    s_out = [np.array([[float(v[0, 1])]], dtype=np.float32) for v in ps]
    cases = [
        ("default", dt.default_profile(), ps),
        ("default without the signal tilt", dt.default_profile(watermark={"signal": 0}), ps),
        ("all transforms", Profile.from_mapping("heavy", heavy, output=dt.SPEC), ps),
        ("default, score output", score, s_out),
    ]
    bound = [(name, prof.bind(key=dt.KEY, ledger=WatermarkLedger()), outs)
             for name, prof, outs in cases]  # fmt: skip
    best = {name: float("inf") for name, _, _ in bound}
    for _ in range(rounds):
        for name, b, outs in bound:
            t = time.process_time()
            for i in range(len(xs)):
                b.apply_at_time(outs[i], inputs=xs[i], account="acct-1", model="digits", now=0.0)
            best[name] = min(best[name], (time.process_time() - t) / len(xs) * 1e6)
        t = time.process_time()
        for _ in range(len(xs)):
            hmac.digest(dt.KEY, b"x" * 520, "sha256")
        best["ref"] = min(best.get("ref", float("inf")), (time.process_time() - t) / len(xs) * 1e6)
    rows = ["| profile | CPU us / batch-1 request (best of rounds) | x one HMAC-SHA256 |",
            "|---|---|---|"]  # fmt: skip
    for name, _, _ in bound:
        rows.append(f"| {name} | {best[name]:.1f} | {best[name] / best['ref']:.1f} |")
    rows.append(f"| (reference: one HMAC-SHA256 of 520 bytes) | {best['ref']:.2f} | 1 |")
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
        print("\n".join(cpu_cost(task, 3 if args.quick else 10)))
        print(f"\n(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
