"""The bundled demo: a digits classifier (made by scripts/make_demo_model.py) and
held-out inputs to send it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np


def repository() -> Path:
    """The bundled model repository (``digits`` version 1)."""
    return Path(str(resources.files("sealserve.demo") / "models"))


def holdout() -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs (float32, shape (n, 64), values 0..16) and their true labels."""
    with resources.files("sealserve.demo").joinpath("digits_holdout.npz").open("rb") as f:
        data = np.load(f)
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def reference_path() -> Path:
    """500 natural training inputs (npz, key 'x'): the distribution detector's reference."""
    return Path(str(resources.files("sealserve.demo") / "reference.npz"))
