"""Every attack, on a small budget, against an undefended demo server (auth off).

Thresholds are set from measured runs with margin (chance is 10%): the digits victim
is an MLP, so equation solving gives a linear approximation; uniform noise is the
weakest query distribution."""

from __future__ import annotations

from typing import Any

import pytest

from sealserve import demo
from sealserve.redteam.attacks import all_attacks
from sealserve.redteam.metrics import Evaluation, run_attack
from sealserve.redteam.oracle import Account, OracleConfig

# attack -> (budget, lowest acceptable fidelity); measured: see docs/redteam.md
CASES = {
    "equation": (300, 0.85),
    "random": (1000, 0.30),
    "jacobian": (300, 0.80),
    "knockoff": (1000, 0.70),
    "averaging": (1000, 0.45),
}


@pytest.fixture(scope="module")
def evaluation() -> Evaluation:
    return Evaluation.demo()


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_extracts_the_undefended_demo(
    name: str, start_server: Any, evaluation: Evaluation
) -> None:
    srv = start_server(model_repository=demo.repository(), unsafe_plaintext=True)
    budget, floor = CASES[name]
    m = run_attack(
        all_attacks(seed=0)[name], srv.target, [Account("attacker", None)], budget=budget,
        evaluation=evaluation, config=OracleConfig(concurrency=8),
        client_kwargs={"unsafe_plaintext": True},
    )  # fmt: skip
    print(f"{name} @ {budget}: fidelity {m.fidelity:.3f}, accuracy {m.accuracy:.3f}, {m.curve}")
    assert (m.sent, m.admitted) == (budget, budget)
    assert m.stopped_because == "budget spent"
    assert m.first_detection is None
    assert m.fidelity >= floor, f"{name}: fidelity {m.fidelity:.3f} < {floor}"
    assert m.curve and m.curve[-1][0] == budget
