"""Rotation over accounts and connections, and refusal handling, against `sealserve
serve` with [auth] and [limits]."""

from __future__ import annotations

import json
from typing import Any

from sealserve.redteam.attacks import Knockoff, Rotation
from sealserve.redteam.metrics import Evaluation, run_attack
from sealserve.redteam.oracle import Account, OracleConfig, RemoteOracle
from tests.redteam.conftest import X0

PLAIN = {"unsafe_plaintext": True}


def test_rotation_spreads_queries_over_accounts_and_connections(deployment: Any) -> None:
    dep = deployment("[limits.tiers.t]\nper_day = 100000\n")
    target = dep.start()
    accounts = [Account(f"acct-{i}", dep.token(f"acct-{i}")) for i in range(4)]
    attack = Rotation(inner=Knockoff(seed=0), connections=2)
    m = run_attack(
        attack, target, accounts, budget=600, evaluation=Evaluation.demo(),
        config=OracleConfig(concurrency=8, batch=5), client_kwargs=PLAIN,
    )  # fmt: skip
    print(f"rotation @ 600: fidelity {m.fidelity:.3f}, per account {m.admitted_per_account}")
    assert m.admitted == 600 and m.sent == 600
    assert set(m.admitted_per_account) == {a.name for a in accounts}
    # Round-robin over 4 accounts x 2 connections: each account carries about a quarter.
    assert all(100 <= n <= 200 for n in m.admitted_per_account.values()), m.admitted_per_account
    assert m.fidelity > 0.6


def test_single_account_attacks_use_one_account(deployment: Any) -> None:
    dep = deployment("[limits.tiers.t]\nper_day = 100000\n")
    target = dep.start()
    accounts = [Account.from_token(dep.token(f"acct-{i}"), default="?") for i in range(3)]
    assert [a.name for a in accounts] == ["acct-0", "acct-1", "acct-2"]
    m = run_attack(
        Knockoff(seed=0), target, accounts, budget=100, evaluation=Evaluation.demo(),
        client_kwargs=PLAIN,
    )  # fmt: skip
    assert m.admitted_per_account == {"acct-0": 100}


LIMITS = (
    "[limits.tiers.t]\nrate = 40\nburst = 10\nper_day = 100000\n[limits.tiers.tiny]\nper_day = 20\n"
)


def test_refusals_are_waited_out_retired_and_counted(deployment: Any) -> None:
    dep = deployment(LIMITS)
    target = dep.start()
    accounts = [
        Account("rated", dep.token("rated", tier="t")),  # rate limited: waits retry-after
        Account("tiny", dep.token("tiny", tier="tiny")),  # daily quota: retry-after > max_wait
        Account("nobody", dep.token("nobody", tier="no-such-tier")),  # refused outright
    ]
    oracle = RemoteOracle(
        target, accounts, budget=60, client_kwargs=PLAIN,
        config=OracleConfig(concurrency=6, max_wait=2.0, time_limit=60),
    )  # fmt: skip
    try:
        import numpy as np

        got = oracle.query(np.repeat(X0["input"], 100, axis=0))
    finally:
        oracle.close()
    ledger = oracle.ledger
    print(json.dumps(ledger.to_dict(), indent=1)[:3000])
    assert int(got.admitted.sum()) == 60 == ledger.admitted
    assert ledger.stopped_because == "budget spent"
    acct = ledger.accounts
    assert acct["tiny"].admitted == 20
    assert acct["tiny"].dropped.startswith("retry-after")
    assert acct["nobody"].admitted == 0 and acct["nobody"].dropped == "suspended or denied"
    assert acct["rated"].admitted == 40 and not acct["rated"].dropped
    assert acct["rated"].refused["throttle"] > 0  # it hit the rate limit and waited
    for a in acct.values():  # every request accounted for
        assert a.sent == a.admitted + sum(a.refused.values())
    assert ledger.first("throttle") is not None and ledger.first("suspend") is not None


def test_attack_stops_cleanly_when_every_account_is_refused(deployment: Any) -> None:
    dep = deployment(LIMITS)
    target = dep.start()
    m = run_attack(
        Knockoff(seed=0), target, [Account("tiny", dep.token("tiny", tier="tiny"))],
        budget=500, evaluation=Evaluation.demo(), client_kwargs=PLAIN,
        config=OracleConfig(concurrency=1, max_wait=1.0),
    )  # fmt: skip
    assert m.admitted == 20
    assert m.sent == 21  # the 21st request was refused, then the account was retired
    assert m.first_throttle == 21
    assert m.first_refusal_per_account == {"tiny": 21}
    assert m.stopped_because == "every account refused or retired"
    assert 0.0 <= m.fidelity <= 1.0  # the replica from 20 answers is still measured


def test_challenge_is_seen_then_paid_and_suspension_drops_the_account(deployment: Any) -> None:
    dep = deployment("[limits.tiers.t]\nper_day = 100000\n")
    target = dep.start()
    dep.set_status(target, "puzzled", "challenged", difficulty=6, reason="test")
    dep.set_status(target, "banned", "suspended", reason="test")
    accounts = [Account("puzzled", dep.token("puzzled")), Account("banned", dep.token("banned"))]
    m = run_attack(
        Knockoff(seed=0), target, accounts, budget=40, evaluation=Evaluation.demo(),
        client_kwargs=PLAIN, config=OracleConfig(concurrency=1),
        admin_token=dep.token("op", scopes=("admin",)), tier="t",
    )  # fmt: skip
    m_rot = m  # the single-account attack uses only "puzzled"
    assert m_rot.admitted_per_account == {"puzzled": 40}
    assert m.first_challenge == 1 and m.first_suspension is None
    assert m.ledger["accounts"]["puzzled"]["refused"] == {"challenge": 1}
    assert m.server_status["puzzled"]["kind"] == "challenged"
    spread = run_attack(
        Rotation(inner=Knockoff(seed=0), connections=1), target, accounts, budget=20,
        evaluation=Evaluation.demo(), client_kwargs=PLAIN, config=OracleConfig(concurrency=1),
    )  # fmt: skip
    assert spread.admitted_per_account == {"puzzled": 20, "banned": 0}
    assert spread.ledger["accounts"]["banned"]["dropped"] == "suspended or denied"
    assert spread.first_suspension is not None


def test_an_unexpected_refusal_retires_the_account_not_the_attack(deployment: Any) -> None:
    """A refusal the oracle has no rule for (here UNAUTHENTICATED: a bad token) is
    counted and retires that account; the others go on (before: the attack crashed)."""
    import numpy as np

    dep = deployment("[limits.tiers.t]\nper_day = 100000\n")
    target = dep.start()
    accounts = [Account("forged", "e30.e30.AAAA"), Account("ok", dep.token("ok"))]
    oracle = RemoteOracle(
        target, accounts, budget=20, client_kwargs=PLAIN,
        config=OracleConfig(concurrency=2, time_limit=60),
    )  # fmt: skip
    try:
        got = oracle.query(np.repeat(X0["input"], 40, axis=0))
    finally:
        oracle.close()
    acct = oracle.ledger.accounts
    assert int(got.admitted.sum()) == 20 == acct["ok"].admitted
    assert acct["forged"].admitted == 0 and acct["forged"].refused["error"] > 0
    assert acct["forged"].dropped == "unexpected AuthenticationError"
