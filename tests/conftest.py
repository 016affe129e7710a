"""Shared fixtures. Everything networked binds loopback only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Fixtures that start servers (start_server, repo), shared by several test packages.
pytest_plugins = ["tests._servers", "tests._redis"]

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


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated ARK -> ASK -> VCEK directory per test session (RSA-4096 is slow)."""
    from sealserve.enclave.simulated import SimulatedPlatform

    path = tmp_path_factory.getbasetemp() / "simulated-platform"
    if not (path / "platform.json").exists():
        SimulatedPlatform.create_root(path)
    return path
