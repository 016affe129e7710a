"""The demo task for the defense experiments: scikit-learn digits (8x8, features 0-16).

Split (fixed seeds): the owner's training half (898), an attacker pool (449) and a
held-out test set (450). The attacker turns its pool into natural-ish queries by
shifting each image by up to one pixel and adding Gaussian noise (sd 1, clipped to
[0, 16]): inputs like the task's, none of them repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

from sealserve.defense.outputs import OutputSpec
from sealserve.defense.release.hot_path import Release
from sealserve.defense.release.profile import Profile

KEY = bytes(range(32))
SPEC = OutputSpec.probabilities(10)
COARSEN = {"input_scale": 16.0}


@dataclass
class Digits:
    x_owner: np.ndarray
    y_owner: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    owner: Any

    def proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.owner.predict_proba(x / 16.0))

    def labels(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.proba(x), axis=1)


def load() -> Digits:
    x, y = load_digits(return_X_y=True)
    xo, xr, yo, yr = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    xp, xt, yp, yt = train_test_split(xr, yr, test_size=0.5, random_state=1, stratify=yr)
    owner = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    owner.fit(xo / 16.0, yo)
    return Digits(xo, yo, xp, yp, xt, yt, owner)


def augment(pool: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """``n`` queries: random pool images shifted by -1..1 px, plus N(0, 1) noise."""
    return augment_labelled(pool, np.zeros(len(pool), dtype=np.int64), n, seed=seed)[0]


def augment_labelled(
    pool: np.ndarray, labels: np.ndarray, n: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment`, also returning the true label of each source image."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pool), n)
    base = pool[idx].reshape(n, 8, 8)
    shifts = rng.integers(-1, 2, (n, 2))
    out = np.empty_like(base)
    for i in range(n):
        out[i] = np.roll(base[i], (int(shifts[i, 0]), int(shifts[i, 1])), axis=(0, 1))
    x = np.clip(out.reshape(n, 64) + rng.normal(0.0, 1.0, (n, 64)), 0.0, 16.0)
    return x, labels[idx]


def default_profile(**overrides: Any) -> Profile:
    return Profile.default(SPEC, coarsen=COARSEN, **overrides)


def soft_targets(release: Release, num_classes: int = 10) -> np.ndarray | None:
    """What a thief that uses probabilities trains on (None: only labels returned)."""
    if release.form == "label":
        return None
    if release.form == "top_k":
        assert release.indices is not None
        full = np.zeros((len(release.values), num_classes))
        np.put_along_axis(full, release.indices, release.values, axis=1)
        return full
    return np.asarray(release.values, dtype=np.float64)


def train_thief(queries: np.ndarray, release: Release, *, seed: int = 0, iters: int = 60) -> Any:
    """The soft-label thief: regress the returned probabilities when there are any
    (distillation), else classify the returned labels. Returns a fitted model whose
    ``predict`` gives labels."""
    soft = soft_targets(release)
    x = queries / 16.0
    if soft is None:
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=iters, random_state=seed)
        return clf.fit(x, np.asarray(release.values))
    reg = MLPRegressor(hidden_layer_sizes=(64,), max_iter=iters, random_state=seed)
    reg.fit(x, soft)
    return _ArgmaxRegressor(reg)


def soft_logistic(x: np.ndarray, soft: np.ndarray, *, c: float = 10.0) -> Any:
    """A logistic regression fitted to probability targets (the thief that uses the
    probabilities): each input appears once per class whose probability exceeds 1e-3,
    weighted by that probability, which minimises the cross-entropy to the targets."""
    from sklearn.linear_model import LogisticRegression

    n, k = soft.shape
    keep = soft > 1e-3
    rows = np.repeat(np.arange(n), k).reshape(n, k)[keep]
    labels = np.tile(np.arange(k), (n, 1))[keep]
    model = LogisticRegression(max_iter=1000, C=c)
    return model.fit(x[rows], labels, sample_weight=soft[keep])


class _ArgmaxRegressor:
    def __init__(self, reg: Any) -> None:
        self.reg = reg

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.reg.predict(x), axis=1)
