"""Each attack starts on an account no earlier attack used (`sealserve redteam`)."""

from __future__ import annotations

from dataclasses import replace

from sealserve.cli.redteam import ATTACKS
from sealserve.redteam.attacks import all_attacks
from sealserve.redteam.metrics import plan_accounts
from sealserve.redteam.oracle import Account


def _accounts(n: int) -> list[Account]:
    return [Account(f"acct-{i}", f"token-{i}") for i in range(n)]


def test_attacks_two_to_five_each_get_a_fresh_account() -> None:
    attacks = [all_attacks()[name] for name in ATTACKS]
    plans, warnings = plan_accounts(attacks, _accounts(6))
    assert warnings == []
    single = [[a.name for a in plan] for attack, plan in zip(attacks, plans, strict=True)
              if attack.accounts == 1]  # fmt: skip
    assert single == [["acct-0"], ["acct-1"], ["acct-2"], ["acct-3"], ["acct-4"]]
    (rotation,) = [p for a, p in zip(attacks, plans, strict=True) if a.name == "rotation"]
    assert len(rotation) == 6  # rotation spreads over every account


def test_too_few_accounts_reuse_from_the_first_and_say_so() -> None:
    attacks = [all_attacks()[name] for name in ("equation", "random", "jacobian")]
    plans, warnings = plan_accounts(attacks, _accounts(2))
    assert [[a.name for a in p] for p in plans] == [["acct-0"], ["acct-1"], ["acct-0"]]
    assert len(warnings) == 1 and warnings[0].startswith("jacobian: no fresh account left")


def test_spread_gives_every_attack_every_account() -> None:
    attacks = [replace(all_attacks()["random"], accounts=None)]  # type: ignore[type-var]
    plans, _ = plan_accounts(attacks, _accounts(3))
    assert len(plans[0]) == 3
