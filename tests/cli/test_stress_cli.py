"""`sealserve stress` says up front when [defense] will act on its own accounts."""

from __future__ import annotations

from sealserve.cli.stress import defense_warning
from sealserve.defense.config import DefenseConfig

ACCOUNTS = ["stress-000", "stress-001"]


def test_a_defended_model_gets_one_warning_line() -> None:
    defense = DefenseConfig.parse(
        {"models": {"digits": {"output": "probabilities", "detection": True}}}
    )
    line = defense_warning(defense, model="digits", tier="standard", accounts=ACCOUNTS)
    assert line is not None and "\n" not in line
    assert line.startswith("warning: [defense] is on for 'digits'")
    assert "stress-000..stress-001" in line and "throttled or suspended" in line
    assert "audit report" in line and "--account-prefix" in line


def test_no_warning_without_defense_for_that_model() -> None:
    assert defense_warning(None, model="digits", tier="t", accounts=ACCOUNTS) is None
    other = DefenseConfig.parse({"models": {"other": {"output": "probabilities"}}})
    assert defense_warning(other, model="digits", tier="t", accounts=ACCOUNTS) is None
