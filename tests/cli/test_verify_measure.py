"""The auditor's commands against a running server on the simulated platform."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealserve.broker.completeness import policy_gaps
from tests.conftest import sealserve_cmd, sealserve_env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sealserve_cmd(*args), env=sealserve_env(), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sim_root: Path) -> Iterator[tuple[str, Path]]:
    from sealserve import demo

    tmp = tmp_path_factory.mktemp("verify")
    shutil.copytree(demo.repository(), tmp / "models")
    cfg = tmp / "sealserve.toml"
    cfg.write_text(
        'model_repository = "models"\nport = 0\nunsafe_disable_auth = true\n'
        f'attestation_platform = "simulated"\nsimulated_platform_dir = "{sim_root}"\n'
        'log_format = "text"\n'
    )
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(proc.stdout.read().decode() if proc.stdout else "no output")
        time.sleep(0.05)
    yield f"127.0.0.1:{json.loads(ready.read_text())['port']}", cfg
    proc.terminate()
    proc.wait(15)


def test_measure_then_verify_online_and_offline(
    served: tuple[str, Path], sim_root: Path, tmp_path: Path
) -> None:
    target, cfg = served
    policy = tmp_path / "policy.toml"
    bare = _run("measure", "--config", str(cfg), "--policy-out", str(policy))
    assert bare.returncode == 1 and "a policy needs the launch measurement" in bare.stderr
    m = _run("measure", "--config", str(cfg), "--launch", "simulated", "--policy-out", str(policy))
    assert m.returncode == 0, m.stderr
    digest = m.stdout.split("manifest sha256")[1].split()[0]
    text = policy.read_text()
    # The form set-policy accepts: platform, launch measurement, manifest, TCB floor.
    assert policy_gaps(text, ["unsafe-simulated"]) == []
    assert f'manifest_digests = ["{digest}"]' in text and "min_tcb = { bl = 3, snp = 8 }" in text
    saved = tmp_path / "evidence.bin"
    v = _run("verify", "--endpoint", target, "--policy", str(policy),
             "--simulated-root", str(sim_root), "--save", str(saved))  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    assert "SIMULATED evidence" in v.stdout
    assert "report_signature         PASS" in v.stdout
    assert "tls_binding              PASS" in v.stdout
    assert f"manifest sha256  {digest}" in v.stdout
    assert "result: VERIFIED" in v.stdout
    off = _run("verify", "--evidence", str(saved), "--policy", str(policy),
               "--simulated-root", str(sim_root), "--json")  # fmt: skip
    assert off.returncode == 0, off.stdout + off.stderr
    report = json.loads(off.stdout)
    assert report["ok"] and report["claims"]["manifest_digest"] == digest
    assert any(c["name"] == "freshness" and c["passed"] is None for c in report["checks"])


def test_verify_rejects_other_measurement(
    served: tuple[str, Path], sim_root: Path, tmp_path: Path
) -> None:
    target, _ = served
    policy = tmp_path / "policy.toml"
    other = "ab" * 48
    policy.write_text(
        f'version = 1\nunsafe_allow_simulated = true\n[sev-snp]\nmeasurement = ["{other}"]\n'
    )
    v = _run(
        "verify", "--endpoint", target, "--policy", str(policy), "--simulated-root", str(sim_root)
    )
    assert v.returncode == 1
    assert "is not in the allowed list" in v.stdout
    assert "result: REJECTED" in v.stdout


def test_verify_default_policy_rejects_simulated(served: tuple[str, Path]) -> None:
    target, _ = served
    v = _run("verify", "--endpoint", target)
    assert v.returncode == 1
    assert "trusted_root" in v.stdout and "REJECTED" in v.stdout


def test_verify_tampered_evidence_file(
    served: tuple[str, Path], sim_root: Path, tmp_path: Path
) -> None:
    target, _ = served
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\nunsafe_allow_simulated = true\n")
    saved = tmp_path / "ev.bin"
    assert _run("verify", "--endpoint", target, "--policy", str(policy), "--simulated-root",
                str(sim_root), "--save", str(saved)).returncode == 0  # fmt: skip
    data = bytearray(saved.read_bytes())
    data[len(data) // 3] ^= 1
    saved.write_bytes(bytes(data))
    v = _run(
        "verify",
        "--evidence",
        str(saved),
        "--policy",
        str(policy),
        "--simulated-root",
        str(sim_root),
    )
    assert v.returncode == 1
    assert "REJECTED" in v.stdout or "error:" in v.stderr
    assert "Traceback" not in v.stderr
