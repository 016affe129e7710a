"""Shared fixtures. Everything networked binds loopback only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "data" / "vectors"


def sealserve_env() -> dict[str, str]:
    """Environment for a ``python -m sealserve`` subprocess that imports this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def sealserve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sealserve", *args]


@pytest.fixture
def repo_root() -> Path:
    return ROOT
