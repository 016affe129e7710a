"""Equation solving (Tramèr et al. 2016) recovers a true softmax model exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sealserve.redteam.attacks import EquationSolving, solve_linear
from sealserve.redteam.metrics import Evaluation, run_attack, run_attack_with
from sealserve.redteam.oracle import Account, LocalOracle
from sealserve.redteam.replica import GroundTruth, LinearSoftmax


def _evaluation(onnx: Path) -> Evaluation:
    from sealserve import demo

    x, y = demo.holdout()
    return Evaluation(x, y, GroundTruth(onnx).predict_proba(x))


def test_solve_linear_is_exact_on_a_softmax_model() -> None:
    rng = np.random.default_rng(1)
    true = LinearSoftmax(rng.normal(size=(64, 10)) * 0.2, rng.normal(size=10))
    x = rng.uniform(0, 16, size=(65, 64))  # d + 1 queries: Tramèr's minimum
    got = solve_linear(x, true.predict_proba(x))
    probe = rng.uniform(0, 16, size=(500, 64))
    assert np.array_equal(got.predict(probe), true.predict(probe))
    assert np.allclose(got.predict_proba(probe), true.predict_proba(probe), atol=1e-6)


def test_equation_solving_recovers_logistic_regression_locally(logreg_repo: Path) -> None:
    onnx = logreg_repo / "logreg" / "1" / "model.onnx"
    evaluation = _evaluation(onnx)
    oracle = LocalOracle(GroundTruth(onnx).predict_proba, budget=65)
    m = run_attack_with(EquationSolving(inputs="uniform"), oracle, evaluation, budget=65)
    assert m.admitted == 65
    assert m.fidelity >= 0.995, m.fidelity


def test_equation_solving_over_the_wire(logreg_repo: Path, start_server: Any) -> None:
    srv = start_server(model_repository=logreg_repo, unsafe_plaintext=True)
    onnx = logreg_repo / "logreg" / "1" / "model.onnx"
    from sealserve.redteam.oracle import OracleConfig

    m = run_attack(
        EquationSolving(inputs="uniform"), srv.target, [Account("a", None)], budget=130,
        evaluation=_evaluation(onnx), config=OracleConfig(model="logreg", concurrency=8),
        client_kwargs={"unsafe_plaintext": True},
    )  # fmt: skip
    print(m.to_json())
    assert (m.sent, m.admitted) == (130, 130)
    # FP32 answers: the recovered model agrees with the victim on (almost) every input.
    assert m.fidelity >= 0.995, m.fidelity
