"""The trust-root attack: an operator starts the server with a PYTHONPATH pointing at a
``sitecustomize.py`` (which could hook decryption). The evidence changes: the attested
manifest shows the hook, and the broker releases no key under a policy that pins the
honest manifest (and the launch measurement). An honest start under the same policy
gets the key, so the policy is not simply unsatisfiable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sealserve.attestation.evidence import Evidence
from sealserve.enclave.manifest import WorkloadManifest
from sealserve.enclave.model_file import encrypt_stream, generate_key
from tests.broker.conftest import Running
from tests.server import models

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]

KEY_ID = "hooked-model"


def _clean_env() -> dict[str, str]:
    """The environment of an honest start: none of the knobs that change what runs."""
    from sealserve.enclave.runtime import ENV_KNOBS

    return {k: v for k, v in os.environ.items() if k not in ENV_KNOBS}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sealserve", *args]


def _serve(cfg: Path, env: dict[str, str], tmp: Path) -> tuple[int, str]:
    """Start `sealserve serve`; (0, "") once it is up (then stopped), or (rc, output)."""
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not ready.exists():
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                return proc.returncode, out
            if time.monotonic() > deadline:
                pytest.fail("server neither started nor exited within 120 s")
            time.sleep(0.1)
        return 0, ""
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_a_sitecustomize_hook_changes_the_manifest_and_gets_no_key(
    start_broker: Callable[..., Running],
    sim_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = start_broker()
    # The owner's encrypted model and its key at the broker (policy set below).
    plain = tmp_path / "plain"
    models.matmul(plain, n_in=8, n_out=4, seed=3)
    repo = tmp_path / "repo"
    (repo / "matmul" / "1").mkdir(parents=True)
    key = generate_key()
    with (plain / "matmul/1/model.onnx").open("rb") as src, \
            (repo / "matmul/1/model.sealed").open("wb") as dst:  # fmt: skip
        encrypt_stream(src, dst, key=key, key_id=KEY_ID, chunk_size=4096)
    running.broker.add_key(KEY_ID, key, roots=("unsafe-simulated",), actor="owner")
    ca = tmp_path / "broker-ca.pem"
    ca.write_bytes(running.ca_pem)
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{repo}"\nport = 0\nunsafe_disable_auth = true\n'
        f'attestation_platform = "simulated"\nsimulated_platform_dir = "{sim_root}"\n'
        f'log_format = "text"\n[key_broker]\ntarget = "{running.target}"\n'
        f'ca_file = "{ca}"\nserver_name = "localhost"\nwait_s = 60\n'
    )
    # The honest reference values, as the owner computes them: launch measurement and
    # manifest, in the form set-policy accepts (no unsafe flag).
    policy = tmp_path / "policy.toml"
    m = subprocess.run(_cmd("measure", "--config", str(cfg), "--launch", "simulated",
                            "--policy-out", str(policy)),
                       env=_clean_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert m.returncode == 0, m.stderr
    honest_digest = m.stdout.split("manifest sha256")[1].split()[0]
    running.broker.set_policy(KEY_ID, policy_toml=policy.read_text(), actor="owner")

    attested: list[WorkloadManifest] = []
    release = running.broker.release

    def recording(key_id: str, evidence: bytes, *, peer: str = "") -> Any:
        attested.append(WorkloadManifest.from_bytes(Evidence.from_bytes(evidence).manifest))
        return release(key_id, evidence, peer=peer)

    monkeypatch.setattr(running.broker, "release", recording)

    # 1. Honest start: the key is released and the server comes up.
    rc, out = _serve(cfg, _clean_env(), tmp_path)
    assert rc == 0, out
    assert attested[-1].digest().hex() == honest_digest

    # 2. The attack: PYTHONPATH with a sitecustomize that runs before anything else.
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "hook-ran"
    (hook / "sitecustomize.py").write_text(
        f"open({str(marker)!r}, 'w').write('the operator code ran')\n"
    )
    env = {**_clean_env(), "PYTHONPATH": str(hook)}
    rc, out = _serve(cfg, env, tmp_path)
    assert marker.exists(), "the hook did not run: the test would prove nothing"
    assert rc != 0 and "key release refused" in out
    evil = attested[-1]
    assert evil.digest().hex() != honest_digest
    runtime = evil.runtime
    hooks = {(h["kind"], h["name"]) for h in runtime["hooks"]}
    assert ("env", "PYTHONPATH") in hooks and ("customize", "sitecustomize") in hooks
    assert "sitecustomize" in runtime["foreign_modules"]
    assert json.dumps(runtime).count(str(hook)) >= 1
