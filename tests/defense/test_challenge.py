"""Proof-of-work challenges: issue, solve, and every way an answer is refused."""

from __future__ import annotations

import hashlib

import pytest

from sealserve.defense.challenge import (
    ChallengeClaims,
    Challenges,
    leading_zero_bits,
    row_bits,
    solve,
)
from sealserve.defense.store.base import StateStore
from sealserve.defense.store.memory import MemoryStore
from sealserve.errors import ChallengeRequiredError, ConfigError

NOW = 1_700_000_000.0


@pytest.fixture
def challenges() -> Challenges:
    return Challenges(Challenges.generate_key(), MemoryStore(), ttl_s=60)


def test_solve_and_verify(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 10, now=NOW)
    assert ch.startswith("pow1.")
    claims = ChallengeClaims.from_challenge(ch)
    assert (claims.account, claims.difficulty, claims.expires_at) == ("alice", 10, NOW + 60)
    sol = solve(ch)
    digest = hashlib.sha256(ch.encode() + sol.encode()).digest()
    assert leading_zero_bits(digest) >= 10
    challenges.verify("alice", ch, sol, now=NOW + 1)


def test_verify_on_each_store(store: StateStore) -> None:
    c = Challenges(Challenges.generate_key(), store)
    ch = c.issue("alice", 4, now=NOW)
    sol = solve(ch)
    c.verify("alice", ch, sol, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="already used"):
        c.verify("alice", ch, sol, now=NOW)


def _wrong(ch: str) -> str:
    for i in range(10_000):
        d = hashlib.sha256(ch.encode() + f"w{i}".encode()).digest()
        if leading_zero_bits(d) < ChallengeClaims.from_challenge(ch).difficulty:
            return f"w{i}"
    raise AssertionError("no wrong answer found")


def test_wrong_answer_is_refused_and_does_not_burn_the_challenge(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 12, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="proof-of-work answer is wrong"):
        challenges.verify("alice", ch, _wrong(ch), now=NOW)
    challenges.verify("alice", ch, solve(ch), now=NOW)


def test_replay_is_refused(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 6, now=NOW)
    sol = solve(ch)
    challenges.verify("alice", ch, sol, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="challenge was already used"):
        challenges.verify("alice", ch, sol, now=NOW + 1)


def test_expired_is_refused(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 6, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="challenge has expired"):
        challenges.verify("alice", ch, solve(ch), now=NOW + 60)


def test_other_account_is_refused(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 6, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="issued to another account"):
        challenges.verify("mallory", ch, solve(ch), now=NOW)


def test_forged_or_foreign_challenge_is_refused(challenges: Challenges) -> None:
    other = Challenges(Challenges.generate_key(), MemoryStore())
    foreign = other.issue("alice", 1, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="challenge is not valid"):
        challenges.verify("alice", foreign, solve(foreign), now=NOW)
    # Lowering the difficulty in the payload breaks the MAC.
    real = challenges.issue("alice", 20, now=NOW)
    magic, _payload, mac = real.split(".")
    easy_payload = foreign.split(".")[1]
    forged = f"{magic}.{easy_payload}.{mac}"
    with pytest.raises(ChallengeRequiredError, match="challenge is not valid"):
        challenges.verify("alice", forged, solve(forged), now=NOW)


@pytest.mark.parametrize("bad", ["", "pow1.x", "pow2.e30.AA", "pow1.!!!.AA", "a.b.c.d"])
def test_malformed_is_refused(challenges: Challenges, bad: str) -> None:
    with pytest.raises(ChallengeRequiredError, match="malformed"):
        challenges.verify("alice", bad, "0", now=NOW)


def test_easier_than_required_is_refused(challenges: Challenges) -> None:
    ch = challenges.issue("alice", 2, now=NOW)
    with pytest.raises(ChallengeRequiredError, match="easier than now required"):
        challenges.verify("alice", ch, solve(ch), now=NOW, min_difficulty=8)


def test_bad_construction() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Challenges(b"short", MemoryStore())
    with pytest.raises(ConfigError, match="ttl must be greater than zero"):
        Challenges(Challenges.generate_key(), MemoryStore(), ttl_s=0)
    c = Challenges(Challenges.generate_key(), MemoryStore())
    with pytest.raises(ConfigError, match=r"difficulty must be 1\.\.32"):
        c.issue("alice", 0, now=NOW)


def test_solve_gives_up() -> None:
    c = Challenges(Challenges.generate_key(), MemoryStore())
    with pytest.raises(ChallengeRequiredError, match="no proof-of-work solution found in 1"):
        solve(c.issue("alice", 32, now=NOW), max_tries=1)


def test_work_scales_with_rows_and_binds_the_row_count(challenges: Challenges) -> None:
    # issue 16: a challenge pays for the rows asked for, and only for that many.
    one = ChallengeClaims.from_challenge(challenges.issue("alice", 3, now=NOW))
    hundred = ChallengeClaims.from_challenge(challenges.issue("alice", 3, now=NOW, rows=100))
    assert (one.rows, one.difficulty) == (1, 3)
    assert (hundred.rows, hundred.difficulty) == (100, 3 + row_bits(100)) == (100, 10)
    ch = challenges.issue("alice", 3, now=NOW, rows=4)
    sol = solve(ch)
    with pytest.raises(ChallengeRequiredError, match="issued for 4 rows; this request has 5"):
        challenges.verify("alice", ch, sol, now=NOW + 1, rows=5)
    # The work proven per row is the base difficulty.
    assert challenges.verify("alice", ch, sol, now=NOW + 1, rows=4) == 3


def test_row_bits() -> None:
    assert [row_bits(n) for n in (1, 2, 3, 4, 32, 33, 4096)] == [0, 1, 2, 2, 5, 6, 12]
