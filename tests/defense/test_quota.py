"""QuotaGuard: limits from the config, graduated responses, errors with clear messages."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from sealserve.defense.challenge import ChallengeClaims, Challenges, leading_zero_bits, solve
from sealserve.defense.limits import LimitsConfig
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import Status
from sealserve.defense.store.base import StateStore
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)

NOW = 1_700_000_000.0 - 1_700_000_000.0 % 86400 + 3600  # 01:00 UTC, far from day's end

CONFIG: dict[str, Any] = {
    "default_tier": "free",
    "tiers": {
        "free": {"rate": 1, "burst": 5, "per_day": 8},
        "batchy": {"per_minute": 10, "cost": "batch", "per_model": True},
    },
    "peer": {"per_minute": 12},
    "model": {"per_day": 1000},
    "models": {"tiny": {"per_minute": 3}},
}


@pytest.fixture
def guard(store: StateStore) -> QuotaGuard:
    cfg = LimitsConfig.from_mapping(CONFIG)
    return QuotaGuard(cfg, store, Challenges(Challenges.generate_key(), store))


def admit(
    guard: QuotaGuard,
    account: str = "alice",
    *,
    tier: str | None = "free",
    peer: str = "198.51.100.1",
    model: str = "resnet",
    now: float = NOW,
    **kw: Any,
) -> Any:
    return guard.admit(account, tier, peer, model, now=now, **kw)


def wrong_answer(challenge: str) -> str:
    """An answer that is certainly wrong (a fixed string would be right 1 time in 2**d)."""
    need = ChallengeClaims.from_challenge(challenge).difficulty
    for i in range(10_000):
        digest = hashlib.sha256(f"{challenge}w{i}".encode()).digest()
        if leading_zero_bits(digest) < need:
            return f"w{i}"
    raise AssertionError("no wrong answer found")


def test_admit_reports_remaining(guard: QuotaGuard) -> None:
    r = admit(guard)
    assert r.admitted
    left = {x.name: x.remaining for x in r.remaining}
    assert left == {"account.rate": 4, "account.day": 7, "peer.minute": 11, "model.day": 999}


def test_rate_limit_message_and_retry_after(guard: QuotaGuard) -> None:
    for _ in range(5):
        admit(guard)
    with pytest.raises(RateLimitedError) as err:
        admit(guard)
    assert str(err.value) == "account rate limit of 1/s (burst 5) exceeded"
    assert err.value.retry_after == pytest.approx(1.0)


def test_daily_quota_message(guard: QuotaGuard) -> None:
    for i in range(8):
        admit(guard, now=NOW + 10 * i)
    with pytest.raises(RateLimitedError) as err:
        admit(guard, now=NOW + 100)
    assert str(err.value) == "account daily quota of 8 requests exhausted"
    assert err.value.retry_after == pytest.approx(86400 - 3600 - 100)


def test_peer_and_model_limits_span_accounts(guard: QuotaGuard) -> None:
    for i in range(3):
        admit(guard, f"user{i}", model="tiny")
    with pytest.raises(RateLimitedError, match="model 'tiny' per-minute quota of 3 requests"):
        admit(guard, "user9", model="tiny")
    for i in range(9):
        admit(guard, f"user{i}")
    with pytest.raises(RateLimitedError, match=r"peer 198\.51\.100\.1 per-minute quota of 12"):
        admit(guard, "user9")
    admit(guard, "user9", peer="198.51.100.2")  # another peer is not affected


def test_batch_cost_and_per_model_counting(guard: QuotaGuard) -> None:
    r = admit(guard, tier="batchy", batch_size=4)
    assert {x.name: x.remaining for x in r.remaining}["account.minute"] == 6
    admit(guard, tier="batchy", batch_size=6)
    with pytest.raises(
        RateLimitedError, match="account model 'resnet' per-minute quota of 10 items exhausted"
    ):
        admit(guard, tier="batchy")
    # Counted per model (another peer: the peer limit counts items across models).
    admit(guard, tier="batchy", model="other", peer="198.51.100.2", batch_size=10)


def test_unknown_tier_is_denied(guard: QuotaGuard) -> None:
    with pytest.raises(PermissionDeniedError, match=r"unknown tier 'gold' \(known: batchy, "):
        admit(guard, tier="gold")


def test_default_tier(guard: QuotaGuard) -> None:
    r = admit(guard, tier=None)
    assert {x.name for x in r.remaining} >= {"account.day"}


def test_throttle_then_lift(guard: QuotaGuard) -> None:
    for _ in range(5):
        admit(guard)
    guard.throttle("alice", 0.1, reason="score 0.8", set_by="detector", now=NOW)
    with pytest.raises(RateLimitedError) as err:
        admit(guard, now=NOW + 1)
    assert err.value.retry_after == pytest.approx(9.0)
    admit(guard, now=NOW + 10)
    guard.lift("alice", reason="false positive", set_by="op:carol", now=NOW + 10)
    admit(guard, now=NOW + 11)
    assert [s.kind for s in guard.history("alice")] == [Status.NORMAL, Status.THROTTLED]


def test_suspend_and_lift(guard: QuotaGuard) -> None:
    guard.suspend("alice", reason="extraction sweep", set_by="op:carol", now=NOW)
    with pytest.raises(SuspendedError) as err:
        admit(guard)
    assert str(err.value) == "account is suspended"  # the reason stays with the operator
    assert err.value.retry_after is None
    assert guard.status("alice", now=NOW).reason == "extraction sweep"
    guard.lift("alice", reason="appeal", set_by="op:carol", now=NOW)
    assert admit(guard).admitted


def test_suspension_expires(guard: QuotaGuard) -> None:
    guard.suspend("alice", reason="cool down", set_by="detector", ttl_s=600, now=NOW)
    with pytest.raises(SuspendedError) as err:
        admit(guard, now=NOW + 100)
    assert err.value.retry_after == pytest.approx(500)
    assert admit(guard, now=NOW + 600).admitted


def test_challenge_flow(guard: QuotaGuard) -> None:
    guard.challenge("alice", 6, reason="sweep suspected", set_by="detector", now=NOW)
    with pytest.raises(ChallengeRequiredError, match="proof-of-work answer required") as err:
        admit(guard)
    ch = err.value.challenge
    assert ch.startswith("pow1.")
    # A client that does not solve it is refused (and gets a fresh challenge) ...
    with pytest.raises(ChallengeRequiredError, match="answer is wrong") as wrong:
        admit(guard, challenge=ch, solution=wrong_answer(ch))
    assert wrong.value.challenge and wrong.value.challenge != ch
    # ... one that solves it succeeds, once.
    sol = solve(ch)
    assert admit(guard, challenge=ch, solution=sol).admitted
    with pytest.raises(ChallengeRequiredError, match="already used"):
        admit(guard, challenge=ch, solution=sol)
    # Another account's challenge does not help.
    guard.challenge("bob", 6, reason="r", set_by="d", now=NOW)
    with pytest.raises(ChallengeRequiredError) as bob_err:
        admit(guard, "bob")
    bob_ch = bob_err.value.challenge
    with pytest.raises(ChallengeRequiredError, match="issued to another account"):
        admit(guard, challenge=bob_ch, solution=solve(bob_ch))


def test_challenged_without_issuer(store: StateStore) -> None:
    g = QuotaGuard(LimitsConfig.from_mapping(CONFIG), store)
    g.challenge("alice", 4, reason="r", set_by="d", now=NOW)
    with pytest.raises(ChallengeRequiredError, match="this server issues none"):
        admit(g)


def test_usage_and_reset(guard: QuotaGuard) -> None:
    for _ in range(3):
        admit(guard)
    assert {u.name: u.remaining for u in guard.usage("alice", "free", now=NOW)} == {
        "account.rate": 2,
        "account.day": 5,
    }
    guard.reset("alice", "free", now=NOW)
    assert {u.name: u.remaining for u in guard.usage("alice", "free", now=NOW)} == {
        "account.rate": 5,
        "account.day": 8,
    }


def test_keys_cannot_collide(guard: QuotaGuard) -> None:
    # "a/b" as an account must not share state with account "a" on model "b".
    for _ in range(8):
        admit(guard, "x/y", now=NOW + 100 * _)
    assert admit(guard, "x", now=NOW).admitted
