"""Where an attacker's queries come from: the digits split, a small natural pool, and
surrogate distributions that differ from the victim's.

Every generator returns float32 arrays of shape ``(n, 64)`` with values in 0..16 (the
demo model's input domain) and takes a ``numpy.random.Generator`` so runs repeat.
scikit-learn (the ``redteam`` extra) is imported inside the functions.
"""

from __future__ import annotations

import functools

import numpy as np

#: The split scripts/make_demo_model.py used to train the victim.
DEMO_SEED = 20261128
LOW, HIGH = 0.0, 16.0
SIDE = 8


@functools.cache
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The victim's (x_train, y_train, x_test, y_test), exactly as the demo was trained.

    The test part equals ``sealserve.demo.holdout()``; attackers never see it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.3, random_state=DEMO_SEED, stratify=y
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def natural_pool(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small sample of natural digits (``per_class`` of each) from the training part:
    the public data an attacker plausibly holds. Never drawn from the held-out test set."""
    x_train, y_train, _, _ = digits_split()
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(y_train == c), per_class, replace=False) for c in range(10)]
    )
    return x_train[idx], y_train[idx]


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise over the input box [0, 16]^64."""
    return rng.uniform(LOW, HIGH, size=(n, SIDE * SIDE)).astype(np.float32)


@functools.cache
def _photographs() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(img.astype(np.float32).mean(axis=2) for img in load_sample_images().images)


def image_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """Natural-image patches: random 16x16..64x64 crops of scikit-learn's two bundled
    photographs (``load_sample_images``), grey, block-averaged to 8x8, contrast
    stretched to 0..16 and inverted half of the time (digits are light ink on dark)."""
    images = _photographs()
    out = np.empty((n, SIDE * SIDE), np.float32)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        cell = int(rng.integers(2, 9))  # patch side = 8 * cell pixels
        side = SIDE * cell
        r = int(rng.integers(img.shape[0] - side))
        c = int(rng.integers(img.shape[1] - side))
        patch = img[r : r + side, c : c + side].reshape(SIDE, cell, SIDE, cell).mean(axis=(1, 3))
        lo, hi = float(patch.min()), float(patch.max())
        patch = (patch - lo) / (hi - lo + 1e-6) * HIGH
        if rng.random() < 0.5:
            patch = HIGH - patch
        out[i] = patch.reshape(-1)
    return out


def transformed(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random distortions of rows of ``base``: rotation up to 35 degrees, scaling
    0.7..1.3, shifts up to 1.5 px, stroke thickening or thinning, contrast change and
    additive noise. Close to digits, but not the victim's distribution."""
    from scipy import ndimage

    out = np.empty((n, SIDE * SIDE), np.float32)
    centre = np.array([(SIDE - 1) / 2, (SIDE - 1) / 2])
    for i in range(n):
        img = base[int(rng.integers(len(base)))].reshape(SIDE, SIDE).astype(np.float64)
        angle = np.deg2rad(rng.uniform(-35, 35))
        scale = rng.uniform(0.7, 1.3)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = rot / scale
        offset = centre - matrix @ centre + rng.uniform(-1.5, 1.5, size=2)
        img = ndimage.affine_transform(img, matrix, offset=offset, order=1, mode="constant")
        stroke = rng.random()
        if stroke < 0.25:
            img = ndimage.grey_dilation(img, size=(2, 2))
        elif stroke < 0.4:
            img = ndimage.grey_erosion(img, size=(2, 1))
        img = img * rng.uniform(0.6, 1.2) + rng.normal(0, 1.0, size=img.shape)
        out[i] = np.clip(img, LOW, HIGH).reshape(-1)
    return out


def surrogate(n: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The knockoff attacker's surrogate distribution: half natural-image patches, half
    distorted digits from the attacker's small pool ``base`` (shuffled together)."""
    k = n // 2
    x = np.concatenate([image_patches(k, rng), transformed(base, n - k, rng)])
    return x[rng.permutation(n)]
