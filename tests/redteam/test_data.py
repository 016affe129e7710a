"""Query sources stay in the victim's input box, and the attacker's pool never
touches the held-out test set."""

from __future__ import annotations

import numpy as np

from sealserve import demo
from sealserve.redteam import data


def test_generators_stay_in_the_input_box() -> None:
    rng = np.random.default_rng(0)
    pool, labels = data.natural_pool(3, rng)
    assert pool.shape == (30, 64) and sorted(set(labels.tolist())) == list(range(10))
    for x in (data.uniform(50, rng), data.image_patches(50, rng),
              data.transformed(pool, 50, rng), data.surrogate(51, pool, rng)):  # fmt: skip
        assert x.dtype == np.float32 and x.shape[1] == 64
        assert x.min() >= 0.0 and x.max() <= 16.0


def test_split_matches_the_demo_holdout_and_pool_avoids_it() -> None:
    _, _, x_test, y_test = data.digits_split()
    hx, hy = demo.holdout()
    assert np.array_equal(x_test, hx) and np.array_equal(y_test, hy)
    pool, _ = data.natural_pool(10, np.random.default_rng(1))
    held = {row.tobytes() for row in hx}
    assert not any(row.tobytes() in held for row in pool)
