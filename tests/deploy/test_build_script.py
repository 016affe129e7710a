"""deploy/build.sh -- the Dockerfile's build logic -- installs a server that works.

One build per session (the ``installed`` fixture in conftest.py: about 20 s with a warm
pip cache, 1-2 min cold; pip may fetch from the package index). The installed server
then runs from its own virtualenv, with nothing of this source tree on its path, and
talks to the test over loopback only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sealserve.enclave.manifest import code_digest
from tests.deploy.conftest import Installed, image_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build(installed: Installed) -> Installed:
    return installed


def test_installs_the_wheel_with_the_server_extra(build: Installed) -> None:
    (wheel,) = build.wheels.glob("sealserve-*.whl")
    assert wheel.name == "sealserve-0.1.0-py3-none-any.whl"
    for line in ("    sealserve==0.1.0", "    onnxruntime==", "    grpcio-health-checking=="):
        assert line in build.log
    assert (build.prefix / "bin" / "sealserve").is_file()
    assert (build.site / "onnxruntime").is_dir()


def test_strips_what_a_server_does_not_need_and_stays_extendable(build: Installed) -> None:
    assert not list(build.prefix.rglob("__pycache__"))
    assert not list(build.site.glob("*/tests"))  # e.g. numpy/tests, scipy's
    assert not list(build.site.glob("setuptools"))
    # pip stays (images pass --strip-pip): an extra can be added to this venv later, and
    # the build says how.
    assert "add an extra later with" in build.log
    out = subprocess.run(
        [str(build.prefix / "bin" / "pip"), "--version"],
        env=image_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and str(build.site) in out.stdout, out.stdout + out.stderr


def test_reports_the_code_digest_of_what_it_installed(build: Installed) -> None:
    # The guide's build runs from the checkout; what is measured is the installed copy.
    assert f"sealserve 0.1.0 at {build.site / 'sealserve'}" in build.log, build.log
    printed = re.search(r"code digest ([0-9a-f]{64})", build.log)
    assert printed is not None, build.log
    installed = code_digest(build.site / "sealserve")
    assert printed.group(1) == installed
    # Every file of the package ships: a clean checkout measures the same.
    assert installed == code_digest(ROOT / "sealserve")


def test_refuses_a_non_empty_prefix(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build.sh"), "--prefix", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "exists and is not empty; refusing to install over it" in out.stderr


@pytest.mark.parametrize(
    ("extras", "message"),
    [
        ("server,evil;rm", "unknown extra 'evil;rm' (known: server, redteam)"),
        (",", "--extras names no extra"),
    ],
)
def test_refuses_an_unknown_extra(tmp_path: Path, extras: str, message: str) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build.sh"), "--prefix", str(tmp_path / "p"),
         "--extras", extras],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (2, f"deploy/build.sh: {message}\n")
    assert not (tmp_path / "p").exists()


def test_usage_error() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build.sh"), "--frobnicate"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unknown argument: --frobnicate" in out.stderr
    assert "usage: deploy/build.sh --prefix DIR" in out.stderr


@pytest.fixture(scope="module")
def served(
    build: Installed, tmp_path_factory: pytest.TempPathFactory, sim_root: Path
) -> Iterator[tuple[str, Path, bytes]]:
    from sealserve import demo

    tmp = tmp_path_factory.mktemp("served")
    shutil.copytree(demo.repository(), tmp / "models")
    cfg = tmp / "sealserve.toml"
    cfg.write_text(
        'model_repository = "models"\nport = 0\nunsafe_disable_auth = true\n'
        f'attestation_platform = "simulated"\nsimulated_platform_dir = "{sim_root}"\n'
        'log_format = "text"\n'
    )
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        [str(build.prefix / "bin" / "sealserve"), "serve", "--config", str(cfg),
         "--ready-file", str(ready)],
        cwd=tmp, env=image_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(proc.stdout.read().decode() if proc.stdout else "no output")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    yield f"127.0.0.1:{info['port']}", cfg, info["tls_cert_pem"].encode()
    proc.terminate()
    assert proc.wait(30) == 0


def _installed(build: Installed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(build.prefix / "bin" / "sealserve"), *args],
        env=image_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_installed_server_answers_health_and_inference(
    build: Installed, served: tuple[str, Path, bytes]
) -> None:
    from sealserve import demo
    from sealserve.client import Client

    target, _, cert = served
    health = _installed(build, "health", "--target", target)
    assert (health.returncode, health.stdout) == (0, f"SERVING {target}\n"), health.stderr
    x, y = demo.holdout()
    with Client(target, root_certificates=cert) as client:
        out = client.infer("digits", {"input": x[:16]})
    assert out["probabilities"].shape == (16, 10)
    assert float(np.mean(out["label"] == y[:16])) > 0.8


def test_installed_server_attests_to_what_its_measure_predicts(
    build: Installed, served: tuple[str, Path, bytes], sim_root: Path, tmp_path: Path
) -> None:
    target, cfg, _ = served
    policy = tmp_path / "policy.toml"
    m = _installed(build, "measure", "--config", str(cfg), "--launch", "simulated",
                   "--policy-out", str(policy))  # fmt: skip
    assert m.returncode == 0, m.stderr
    assert f"code digest               {code_digest(build.site / 'sealserve')}" in m.stdout
    # The written policy pins the (simulated) launch measurement and the manifest.
    assert "unsafe_allow_simulated = true" in policy.read_text()
    v = _installed(build, "verify", "--endpoint", target, "--policy", str(policy),
                   "--simulated-root", str(sim_root))  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    assert "result: VERIFIED" in v.stdout
