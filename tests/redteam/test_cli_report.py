"""`sealserve redteam` end to end, the report, metrics JSON and honest-user utility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sealserve import demo
from sealserve.cli.main import main
from sealserve.redteam.metrics import Evaluation, RunMetrics, honest_utility
from sealserve.redteam.report import markdown


def test_cli_runs_attacks_and_writes_a_report(
    start_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = start_server(model_repository=demo.repository(), unsafe_plaintext=True)
    out = tmp_path / "report"
    code = main([
        "redteam", "--target", srv.target, "--plaintext", "--attack", "jacobian",
        "--attack", "equation", "--budget", "200", "--concurrency", "4", "--out", str(out),
        "--honest", "5", "--honest-rate", "50",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "jacobian: budget 200" in printed and "answers -> fidelity" in printed
    assert "honest users: agreement 1.0000, refused accounts 0" in printed
    text = (out / "report.md").read_text()
    assert "| jacobian | 200 | 200 | 200 |" in text and "| equation | 200 |" in text
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["attack"] for r in runs] == ["jacobian", "equation"]
    assert all(r["fidelity"] > 0.8 for r in runs), [r["fidelity"] for r in runs]


def test_cli_rejects_a_zero_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redteam", "--target", "127.0.0.1:1", "--plaintext", "--budget", "0"]) != 0
    assert "--budget must be at least 1" in capsys.readouterr().err


def test_metrics_json_and_markdown() -> None:
    m = RunMetrics("knockoff", 1000, 2, sent=1010, admitted=1000, fidelity=0.9,
                   curve=[(100, 0.5), (1000, 0.9)], first_throttle=400)  # fmt: skip
    d = json.loads(m.to_json())
    assert d["first_detection"] == 400 and d["curve"] == [[100, 0.5], [1000, 0.9]]
    assert m.fidelity_at(500) == 0.5 and m.fidelity_at(50) is None
    assert "| knockoff | 1000 | 1010 | 1000 |" in markdown([m], target="t")
    assert "| n/a |" in markdown([m], target="t")  # no watermark hook


def test_honest_users_on_an_undefended_server(start_server: Any) -> None:
    srv = start_server(model_repository=demo.repository(), unsafe_plaintext=True)
    h = honest_utility(srv.target, [None] * 10, Evaluation.demo(), per_account=5, rate=20,
                       client_kwargs={"unsafe_plaintext": True})  # fmt: skip
    assert (h.accounts, h.queries, h.answered) == (10, 50, 50)
    assert h.agreement == 1.0 and h.prob_error < 1e-6 and h.refused_accounts == 0
