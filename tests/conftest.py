"""Shared fixtures. Everything networked binds loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def serve_until_ready(
    config: Path, ready: Path, *, timeout: float = 90.0
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``sealserve serve --config CONFIG --ready-file READY`` and wait for the ready
    file (fails the test with the server's output if it exits or times out first)."""
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(config), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(proc.stdout.read().decode() if proc.stdout else "no output")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


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
