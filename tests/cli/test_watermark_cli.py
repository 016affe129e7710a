"""`sealserve watermark verify` and `sealserve replica-check` on a replica trained from a
defended server's answers, and on an innocent model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve import demo
from sealserve.client import Client
from tests.conftest import sealserve_cmd, sealserve_env

pytest.importorskip("skl2onnx")


def _onnx(model: Any, path: Path) -> Path:
    from skl2onnx import to_onnx

    onx = to_onnx(model, np.zeros((1, 64), np.float32), options={id(model): {"zipmap": False}})
    path.write_bytes(onx.SerializeToString())
    return path


@pytest.mark.slow
def test_watermark_proven_on_replica_not_on_innocent(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    defense = {
        "state_dir": str(tmp_path / "state"),
        "audit": {"enabled": False},
        "profiles": {"p": {"round": 3, "renormalise": True, "preserve_top1": True,
                           "coarsen": {"input_scale": 16}, "watermark": {"fraction": 0.05,
                                         "band": {"margin": 0.3, "rate": 0.05}}}},
        "models": {"digits": {"output": "probabilities", "label": "label", "profile": "p",
                              "detection": False}},
    }  # fmt: skip
    running = start_server(model_repository=demo.repository(), unsafe_plaintext=True,
                           attestation_platform="simulated", simulated_platform_dir=sim_root,
                           defense=defense)  # fmt: skip
    x_all, y_all = load_digits(return_X_y=True)
    rng = np.random.default_rng(1)
    queries = np.clip(np.repeat(x_all, 2, axis=0) + rng.normal(0, 0.7, (2 * len(x_all), 64)), 0, 16)
    queries = queries.astype(np.float32)
    answers = []
    with Client(running.target, unsafe_plaintext=True) as c:
        for i in range(0, len(queries), 32):
            answers.append(c.infer("digits", {"input": queries[i : i + 32]})["label"])
    labels = np.concatenate(answers)
    running.server.defense_secrets.save_ledger()
    ledger = tmp_path / "state" / "watermark-ledger"
    assert ledger.is_file()
    with threadpool_limits(1):
        replica = MLPClassifier((128,), max_iter=400, random_state=0).fit(queries, labels)
        innocent = MLPClassifier((64,), max_iter=300, random_state=7).fit(x_all, y_all)
    replica_path = _onnx(replica, tmp_path / "replica.onnx")
    innocent_path = _onnx(innocent, tmp_path / "innocent.onnx")
    base = ["watermark", "verify", "--ledger", str(ledger), "--simulated-root", str(sim_root)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(sealserve_cmd(*args), env=sealserve_env(), capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip

    stolen = run(*base, "--suspect", str(replica_path))
    assert stolen.returncode == 0, stolen.stderr
    assert "WATERMARK PRESENT" in stolen.stdout
    assert "probes replayed" in stolen.stdout  # the server kept boundary probes
    assert "band cells replayed" in stolen.stdout  # the band test ran beside the others
    p_stolen = float(
        stolen.stdout.split("p-value (one-sided, all tests, Bonferroni)")[1].split()[0]
    )
    assert p_stolen < 1e-6
    clean = run(*base, "--suspect", str(innocent_path), "--json")
    assert clean.returncode == 0, clean.stderr
    report = json.loads(clean.stdout)
    assert report["watermark_present"] is False and report["p_value"] > 0.01
    assert report["band"]["examined"] > 0 and report["band"]["p_value"] > 1e-4
    # The same proof against a suspect that only answers over an OIP endpoint (here the
    # replica served by a second sealserve; any OIP server would do).
    suspect_repo = tmp_path / "suspect-repo"
    (suspect_repo / "stolen" / "1").mkdir(parents=True)
    (suspect_repo / "stolen" / "1" / "model.onnx").write_bytes(replica_path.read_bytes())
    suspect_server = start_server(model_repository=suspect_repo, unsafe_plaintext=True)
    remote = run(*base, "--suspect-endpoint", suspect_server.target, "--model", "stolen",
                 "--plaintext")  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert "WATERMARK PRESENT" in remote.stdout
    down = run(*base, "--suspect-endpoint", "127.0.0.1:9", "--model", "stolen", "--plaintext")
    assert down.returncode == 1 and "Traceback" not in down.stderr  # reported, not crashed
    check = run("replica-check", "--original", str(demo.repository() / "digits" / "1" / "model.onnx"),
                "--ledger", str(ledger), "--simulated-root", str(sim_root),
                "--suspect", str(replica_path))  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "watermark" in check.stdout and "boundary" in check.stdout
    # Without reference models there is no verdict, only the demo's figures.
    assert "verdict: none" in check.stdout
    # With independently trained references: the replica stands out, the innocent not.
    from sklearn.linear_model import LogisticRegression

    with threadpool_limits(1):
        refs = [
            MLPClassifier((64,), max_iter=300, random_state=11).fit(x_all, y_all),
            MLPClassifier((32,), max_iter=300, random_state=12).fit(x_all, y_all),
            LogisticRegression(max_iter=2000).fit(x_all, y_all),
        ]
    ref_args = []
    for i, ref in enumerate(refs):
        ref_args += ["--reference", str(_onnx(ref, tmp_path / f"ref{i}.onnx"))]
    judged = {}
    for name, path in (("replica", replica_path), ("innocent", innocent_path)):
        out = run("replica-check", "--original",
                  str(demo.repository() / "digits" / "1" / "model.onnx"), "--ledger", str(ledger),
                  "--simulated-root", str(sim_root), "--suspect", str(path), "--json",
                  *ref_args)  # fmt: skip
        assert out.returncode == 0, out.stderr
        judged[name] = json.loads(out.stdout)
    print(judged)
    assert judged["replica"]["replica_likely"] is True
    assert judged["innocent"]["replica_likely"] is False
    # A ledger sealed under another measurement/platform does not open.
    wrong_root = tmp_path / "other-root"
    from sealserve.enclave.simulated import SimulatedPlatform

    SimulatedPlatform.create_root(wrong_root)
    refused = run("watermark", "verify", "--ledger", str(ledger), "--simulated-root", str(wrong_root),
                  "--suspect", str(replica_path))  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
