"""The digits demo task and its query streams (shared by tests and bench/bench_detect.py).

The "model" is a logistic regression trained on digits 0-4 of scikit-learn's
``load_digits`` (8x8 images, 64 features in 0..16). The natural in-task images not used
for training are split in two: split A tunes thresholds, split B tests them. The
off-task stream is digits 5-9 (natural images from another task). The model's training
images are the owner's honest reference sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DigitsTask:
    model: Any
    reference: Array
    split_a: Array
    split_b: Array
    off_task: Array
    seeds: Array

    def predict(self, x: Array) -> npt.NDArray[np.int64]:
        return np.asarray(self.model.predict(np.atleast_2d(x)), dtype=np.int64)


@lru_cache(maxsize=1)
def digits_task(seed: int = 0) -> DigitsTask:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    in_task = rng.permutation(np.flatnonzero(y < 5))
    n = in_task.size
    train, a, b = in_task[: n // 2], in_task[n // 2 : 3 * n // 4], in_task[3 * n // 4 :]
    model = LogisticRegression(max_iter=3000, random_state=seed).fit(x[train], y[train])
    return DigitsTask(
        model=model,
        reference=x[train],
        split_a=x[a],
        split_b=x[b],
        off_task=x[y >= 5],
        seeds=x[a][:10],
    )


def uniform_stream(n: int, rng: np.random.Generator) -> Array:
    """Uniform random inputs over the whole input range."""
    return rng.uniform(0.0, 16.0, size=(n, 64))


def jacobian_stream(task: DigitsTask, n: int, *, lam: float = 1.6) -> Array:
    """Papernot et al. Jacobian-based augmentation from ``task.seeds``.

    Each round adds ``x + lam * sign(d f_c / d x)`` for every point ``x`` so far, with
    ``c`` the model's label for ``x``; for a linear model the gradient of class ``c``'s
    logit is its coefficient row. ``lam = 1.6`` is the paper's 0.1 on the 0..16 scale.
    """
    out = [task.seeds]
    current = task.seeds
    total = current.shape[0]
    coef = task.model.coef_
    sign = 1.0
    while total < n:
        labels = task.predict(current)
        new = np.clip(current + sign * lam * np.sign(coef[labels]), 0.0, 16.0)
        out.append(new)
        current = np.concatenate([current, new])
        total += new.shape[0]
        sign = -sign  # periodic step-size sign flip (Papernot et al., reservoir variant)
    return np.concatenate(out)[:n]


def off_task_stream(task: DigitsTask, n: int, rng: np.random.Generator) -> Array:
    """Natural images of digits 5-9, which the 0-4 model was never meant to see."""
    idx = rng.permutation(task.off_task.shape[0])
    reps = -(-n // idx.size)
    return task.off_task[np.tile(idx, reps)[:n]]


def honest_stream(
    pool: Array, labels: npt.NDArray[np.int64], n: int, rng: np.random.Generator
) -> Array:
    """Organic, clustered traffic: an account favours some classes (Dirichlet weights)
    and sends natural images of them, with repeats, from ``pool``."""
    classes = np.unique(labels)
    weights = rng.dirichlet(np.ones(classes.size))
    chosen = rng.choice(classes, size=n, p=weights)
    out = np.empty((n, pool.shape[1]))
    for c in classes:
        rows = np.flatnonzero(chosen == c)
        members = np.flatnonzero(labels == c)
        out[rows] = pool[rng.choice(members, size=rows.size)]
    return out
