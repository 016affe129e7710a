"""The defense on the demo task (scikit-learn digits): honest utility, watermark power,
no false claims, replica check and a replica-fidelity experiment.

Numbers are printed (``pytest -s``); bench/bench_defense_outputs.py prints the full table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC

from sealserve.defense.release.hot_path import Release
from sealserve.defense.watermark.ledger import WatermarkLedger
from sealserve.defense.watermark.replica import boundary_inputs, replica_check
from sealserve.defense.watermark.verify import verify
from tests.defense import digits_task as dt

QUERIES = 10_000


@dataclass
class Attack:
    task: dt.Digits
    queries: np.ndarray
    release: Release
    ledger: WatermarkLedger


@pytest.fixture(scope="module")
def task() -> dt.Digits:
    return dt.load()


@pytest.fixture(scope="module")
def attack(task: dt.Digits) -> Attack:
    ledger = WatermarkLedger()
    bound = dt.default_profile().bind(key=dt.KEY, ledger=ledger)
    q = dt.augment(task.x_pool, QUERIES, seed=3)
    release = bound.apply_at_time(task.proba(q), inputs=q, account="thief", model="digits", now=0.0)
    return Attack(task, q, release, ledger)


def scaled(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a suspect on raw 0-16 inputs: its probabilities when it has them
    (as an ONNX export or an OIP endpoint would return), else its labels."""
    if hasattr(model, "predict_proba"):
        return lambda x: np.asarray(model.predict_proba(x / 16.0))
    return lambda x: np.asarray(model.predict(x / 16.0))


def test_honest_utility_with_default_profile(task: dt.Digits) -> None:
    bound = dt.default_profile().bind(key=dt.KEY, ledger=WatermarkLedger())
    clean = task.proba(task.x_test)
    r = bound.apply_at_time(clean, inputs=task.x_test, account="honest", model="digits", now=0.0)
    agreement = float(np.mean(np.argmax(r.values, 1) == np.argmax(clean, 1)))
    change = float(np.mean(np.abs(r.values - clean)))
    print(
        f"\nhonest top-1 agreement {agreement:.4f}, marked {int(r.marked.sum())}, "
        f"mean |dp| {change:.4f} on {len(clean)} test inputs"
    )
    assert agreement >= 0.995
    assert 0 < change < 0.05
    assert np.allclose(r.values.sum(1), 1.0, atol=0.01)


def replicas() -> dict[str, Any]:
    """Replicas trained on the stolen labels (the marks test must catch these)."""
    return {
        "mlp": MLPClassifier(hidden_layer_sizes=(128,), max_iter=120, random_state=1),
        "extra_trees": ExtraTreesClassifier(n_estimators=40, random_state=0),
        "random_forest": RandomForestClassifier(n_estimators=40, random_state=0),
    }


def innocents(task: dt.Digits) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
    """20 models that never saw our answers: true labels, other seeds, algorithms, data."""
    xo, yo, xp, yp = task.x_owner, task.y_owner, task.x_pool, task.y_pool
    rng = np.random.default_rng(42)
    out: list[tuple[str, Any, np.ndarray, np.ndarray]] = []
    for i in range(20):
        kind = i % 7
        idx = rng.choice(len(xo), size=600, replace=False)
        x, y = xo[idx], yo[idx]
        if i % 3 == 0:  # some learn from other people's data, augmented
            xa, ya = dt.augment_labelled(xp, yp, 1500, seed=100 + i)
            x, y = np.vstack([xp, xa]), np.concatenate([yp, ya])
        model: Any = [
            LogisticRegression(max_iter=300, C=[0.1, 1.0, 10.0][i % 3]),
            MLPClassifier(hidden_layer_sizes=(32 + 16 * (i % 3),), max_iter=150, random_state=i),
            ExtraTreesClassifier(n_estimators=30, random_state=i),
            RandomForestClassifier(n_estimators=30, random_state=i),
            KNeighborsClassifier(n_neighbors=1 + 2 * (i % 3)),
            SVC(gamma="scale", C=1 + i),
            GaussianNB(),
        ][kind]
        out.append((type(model).__name__, model, x, y))
    return out


def test_watermark_power_and_no_false_claims(attack: Attack) -> None:
    task = attack.task
    ledger_n = len(attack.ledger)
    assert ledger_n >= 15
    assert len(attack.ledger.probes(account="thief")) >= 500
    stolen_labels = np.argmax(attack.release.values, 1)
    lines = [
        f"\nwatermark entries for 'thief': {ledger_n} marks, "
        f"{len(attack.ledger.probes(account='thief'))} boundary probes, {QUERIES} queries"
    ]
    powers = {}
    for name, model in replicas().items():
        # The thief trains on the raw 0-16 features, as it sends them.
        model.fit(attack.queries, stolen_labels)
        powers[name] = verify(attack.ledger, model.predict_proba, account="thief", num_classes=10)
    # Replicas that learn from the probabilities (the thief uses what it gets): a
    # linear one, and an MLP distilled from them (normalised inputs, smooth).
    logistic = dt.soft_logistic(attack.queries / 16.0, attack.release.values)
    powers["logistic"] = verify(attack.ledger, scaled(logistic), account="thief", num_classes=10)
    distilled = dt.train_thief(attack.queries, attack.release).reg

    def distilled_proba(x: np.ndarray) -> np.ndarray:
        out = np.clip(distilled.predict(x / 16.0), 1e-4, None)
        return np.asarray(out / out.sum(axis=1, keepdims=True))

    powers["mlp_distilled"] = verify(
        attack.ledger, distilled_proba, account="thief", num_classes=10
    )
    for name, rep in powers.items():
        sig = rep.signal
        assert sig is not None
        lines.append(
            f"replica {name:<14} marks {rep.matches}/{rep.cells} p={rep.marks_p_value:.3g}; "
            f"signal z={sig.z:.2f} ({sig.mode}); combined p={rep.p_value:.3g}"
        )
    for name in ("logistic", "mlp_distilled", "mlp", "extra_trees", "random_forest"):
        assert powers[name].p_value < 1e-6, powers[name].render()
        assert powers[name].watermark_present
    # The linear replica cannot memorise the scattered marks; the signal proves it.
    for name in ("logistic", "mlp_distilled"):
        sig = powers[name].signal
        assert sig is not None and sig.mode == "scores" and sig.p_value < 1e-6
    worst = 1.0
    for name, model, x, y in innocents(task):
        model.fit(x / 16.0, y)
        rep = verify(attack.ledger, scaled(model), account="thief", num_classes=10)
        worst = min(worst, rep.p_value)
        sig = rep.signal
        assert sig is not None
        lines.append(
            f"innocent {name:<24} marks {rep.matches}/{rep.cells} "
            f"(disagree on {rep.trials}); signal z={sig.z:.2f} ({sig.mode}); p={rep.p_value:.3g}"
        )
        assert rep.p_value > 0.01, rep.render()
        assert not rep.watermark_present
    print("\n".join(lines) + f"\nsmallest innocent p-value {worst:.3g}")


def test_replica_check_flags_replicas(attack: Attack) -> None:
    task = attack.task
    stolen_labels = np.argmax(attack.release.values, 1)
    refs = []
    for seed, model in enumerate(
        [
            LogisticRegression(max_iter=300),
            MLPClassifier(hidden_layer_sizes=(48,), max_iter=150, random_state=7),
            ExtraTreesClassifier(n_estimators=30, random_state=3),
            KNeighborsClassifier(n_neighbors=3),
            SVC(gamma="scale"),
        ]
    ):
        idx = np.random.default_rng(seed).choice(len(task.x_owner), 700, replace=False)
        refs.append(scaled(model.fit(task.x_owner[idx] / 16.0, task.y_owner[idx])))
    candidates = dt.augment(task.x_test, 3000, seed=11)
    probes = {
        "watermark": np.stack([e.input for e in attack.ledger.entries(account="thief")]),
        "boundary": boundary_inputs(task.proba, candidates, count=300),
        "natural": task.x_test,
    }
    original = task.labels
    lr = LogisticRegression(max_iter=300, C=10.0).fit(attack.queries / 16.0, stolen_labels)
    report = replica_check(original, scaled(lr), probes, references=refs)
    print("\n" + report.render())
    assert report.replica_likely
    boundary = next(p for p in report.probes if p.probe == "boundary")
    assert boundary.baseline_max is not None and boundary.agreement > boundary.baseline_max
    assert '"replica_likely": true' in report.to_json()
    # An independently trained model, as strong as the references, is not flagged.
    idx = np.random.default_rng(99).choice(len(task.x_owner), 700, replace=False)
    innocent = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=21)
    innocent.fit(task.x_owner[idx] / 16.0, task.y_owner[idx])
    clean = replica_check(original, scaled(innocent), probes, references=refs)
    print(clean.render())
    assert not clean.replica_likely


def test_fidelity_experiment_runs(attack: Attack, task: dt.Digits) -> None:
    q = attack.queries
    truth = task.labels(task.x_test)
    clean = dt.train_thief(q, Release(task.proba(q), np.zeros(len(q), bool)))
    defended = dt.train_thief(q, attack.release)
    fid_clean = float(np.mean(clean.predict(task.x_test / 16.0) == truth))
    fid_def = float(np.mean(defended.predict(task.x_test / 16.0) == truth))
    print(
        f"\nsoft-label thief, {len(q)} queries: fidelity {fid_clean:.3f} on clean answers, "
        f"{fid_def:.3f} on default-profile answers"
    )
    assert 0.85 < fid_clean <= 1.0
    assert 0.5 < fid_def <= 1.0
