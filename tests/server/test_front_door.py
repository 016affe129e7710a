"""Issue 16 (front-door): no side doors on the request path.

Every answer of a defended model passes the defenses whichever outputs the request
names; rows are counted and capped before inference; a large batch that trips
suspension is not answered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve import demo
from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.defense.status import DEFAULT_DIFFICULTY
from sealserve.errors import (
    ChallengeRequiredError,
    InputError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)
from tests.server.test_defenses_rpc import AUD, ISS, TOS, _defense

REFUSED = (RateLimitedError, ChallengeRequiredError, PermissionDeniedError, SuspendedError)


def _start(start_server: Any, tmp: Path, sim_root: Path, *, limits: dict[str, Any] | None = None,
           state_store: str = "memory:", **defense: Any) -> tuple[Any, TokenIssuer]:  # fmt: skip
    pem, jwks = generate_keypair("ES256")
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    auth = {"audience": AUD, "required_tos_version": TOS,
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp / "jwks.json")}]}  # fmt: skip
    running = start_server(
        model_repository=demo.repository(), unsafe_plaintext=True, auth=auth,
        attestation_platform="simulated", simulated_platform_dir=sim_root,
        state_store=state_store,
        limits=limits or {"tiers": {"standard": {"rate": 1000, "burst": 1000,
                                                 "per_day": 100000}}},
        defense=_defense(tmp, **defense),
    )  # fmt: skip
    return running, TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)


def _client(running: Any, issuer: TokenIssuer, account: str) -> Client:
    token = issuer.issue(account, tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)
    return Client(running.target, unsafe_plaintext=True, token=token, solve_challenges=False)


COMBOS = {"labels": ("label",), "probs": ("probabilities",), "both": ("label", "probabilities")}


def test_every_output_combination_passes_the_same_defenses(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    x, _ = demo.holdout()
    rng = np.random.default_rng(7)
    # Honest-looking rows first (so marks accumulate), then a uniform-noise sweep.
    rows = np.concatenate([x[:100], rng.uniform(0, 16, (200, 64)).astype(np.float32)])
    refused_at: dict[str, int | None] = {}
    for account, outputs in COMBOS.items():
        refused_at[account] = None
        with _client(running, issuer, account) as c:
            for i in range(len(rows)):
                try:
                    out = c.infer("digits", {"input": rows[i : i + 1]}, outputs=outputs)
                except REFUSED:
                    refused_at[account] = i
                    break
                assert set(out) == set(outputs)  # only what was asked for comes back
    # The same detector fires at the same row whatever the request names.
    assert len(set(refused_at.values())) == 1, refused_at
    assert refused_at["labels"] is not None and refused_at["labels"] < 300
    quota = running.server.plane.guard.quota
    for account in COMBOS:
        status = quota.status(account)
        assert status.set_by == "detector" and "distribution" in status.reason.lower()
    # The same marks are recorded (the keyed selection does not depend on the account
    # or on the outputs asked for).
    ledger = running.server.defense_secrets.ledger
    marked = {a: sorted(e.cell for e in ledger.entries(account=a)) for a in COMBOS}
    assert marked["labels"] and marked["labels"] == marked["probs"] == marked["both"]


def test_label_only_answers_follow_the_defended_output(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    x, _ = demo.holdout()
    with _client(running, issuer, "honest") as c:
        both = c.infer("digits", {"input": x[:40]}, outputs=("label", "probabilities"))
        label = c.infer("digits", {"input": x[:40]}, outputs=("label",))
    # The label is the argmax of the perturbed answer (a watermarked row's label is the
    # mark), identical whether or not the probabilities were asked for.
    assert np.array_equal(label["label"], both["label"])
    assert np.array_equal(both["label"], np.argmax(both["probabilities"], axis=1))
    marked = running.server.defense_secrets.ledger.entries(account="honest")
    # 2 requests of the same 40 rows: the marked rows appear once per request.
    assert len(marked) % 2 == 0


def test_an_output_the_defenses_do_not_cover_is_refused_before_admission(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    d = _defense(tmp_path)
    d["models"]["digits"].pop("label")  # 'label' is no longer covered
    running, issuer = _start(start_server, tmp_path, sim_root, models=d["models"])
    quota = running.server.plane.guard.quota
    x, _ = demo.holdout()

    def spent() -> int:
        day = next(r for r in quota.usage("someone", "standard") if r.name == "account.day")
        return day.limit - day.remaining

    with _client(running, issuer, "someone") as c:
        with pytest.raises(InputError, match="'label' of model 'digits' is not covered"):
            c.infer("digits", {"input": x[:5]}, outputs=("label",))
        with pytest.raises(InputError, match="'no-such-output' is not an output"):
            c.infer("digits", {"input": x[:5]}, outputs=("no-such-output",))
        with pytest.raises(InputError, match="'label' of model 'digits' is not covered"):
            c.infer("digits", {"input": x[:5]}, outputs=("probabilities", "label"))
        # Refused before admission: none of those rows was charged.
        assert spent() == 0
        # The server keeps serving, and charges what it answers.
        assert c.infer("digits", {"input": x[:3]}, outputs=("probabilities",))
        assert spent() == 3


def test_unsafe_undefended_outputs_are_served_when_declared(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    d = _defense(tmp_path)
    d["models"]["digits"].pop("label")
    d["models"]["digits"]["unsafe_undefended_outputs"] = ["label"]
    running, issuer = _start(start_server, tmp_path, sim_root, models=d["models"])
    x, _ = demo.holdout()
    with _client(running, issuer, "someone") as c:
        out = c.infer("digits", {"input": x[:3]}, outputs=("label",))
    assert set(out) == {"label"} and out["label"].shape == (3,)


def test_a_batch_that_trips_suspension_is_not_answered(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    rng = np.random.default_rng(3)
    batch = rng.uniform(0, 16, (1000, 64)).astype(np.float32)
    with _client(running, issuer, "bulk") as c:
        with pytest.raises(SuspendedError, match="batch of 1000 rows was not answered"):
            c.infer("digits", {"input": batch})
    quota = running.server.plane.guard.quota
    assert quota.status("bulk").kind.value == "suspended"
    # The rows were counted (per row on a defended tier) although nothing was answered.
    day = next(r for r in quota.usage("bulk", "standard") if r.name == "account.day")
    assert day.limit - day.remaining == 1000


def test_an_honest_batch_is_answered(start_server: Any, tmp_path: Path, sim_root: Path) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    x, _ = demo.holdout()
    with _client(running, issuer, "honest-bulk") as c:
        out = c.infer("digits", {"input": x[:200]})
    assert out["label"].shape == (200,)


def test_a_request_above_the_row_cap_is_refused_before_inference(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    limits = {"tiers": {"standard": {"rate": 1000, "burst": 1000, "per_day": 100000,
                                     "max_rows": 100}}}  # fmt: skip
    running, issuer = _start(start_server, tmp_path, sim_root, limits=limits)
    x, _ = demo.holdout()
    with _client(running, issuer, "big") as c:
        with pytest.raises(InputError, match="request has 200 rows; tier 'standard' allows "
                                             "at most 100 rows per request"):  # fmt: skip
            c.infer("digits", {"input": np.concatenate([x, x])[:200]})
        assert c.infer("digits", {"input": x[:100]})["label"].shape == (100,)
    quota = running.server.plane.guard.quota
    day = next(r for r in quota.usage("big", "standard") if r.name == "account.day")
    assert day.limit - day.remaining == 100  # the refused request cost nothing


def _flag(running: Any, issuer: TokenIssuer, account: str, rows: np.ndarray) -> int:
    """Send uniform rows one by one until refused; return how many were answered."""
    with _client(running, issuer, account) as c:
        for i in range(len(rows)):
            try:
                c.infer("digits", {"input": rows[i : i + 1]})
            except REFUSED:
                return i
    return len(rows)


def test_lift_holds_for_its_grace_period_and_forgive_clears_the_detectors(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    rng = np.random.default_rng(11)
    rows = rng.uniform(0, 16, (400, 64)).astype(np.float32)
    quota = running.server.plane.guard.quota
    first = _flag(running, issuer, "mallory", rows)
    assert first < 200 and quota.status("mallory").set_by == "detector"
    # An operator lifts: the next queries (the same noise) do not undo it.
    quota.lift("mallory", reason="reviewed", set_by="admin:op")
    with _client(running, issuer, "mallory") as c:
        for i in range(20):
            c.infer("digits", {"input": rows[200 + i : 201 + i]})
    assert quota.status("mallory").kind.value == "normal"
    # Forgive clears the detector state: the account starts from nothing (its scores
    # restart below the detectors' minimum evidence) and the audit log says so.
    output = running.server.plane.guard.output
    epoch = output.forgive("mallory", by="admin:op")
    assert epoch == 1
    status = quota.status("mallory")
    assert status.kind.value == "normal" and status.reason.startswith("forgiven by admin:op")
    suite = output.models["digits"].suite
    fresh = suite.observe_at_time("mallory\x001", "digits", rows[300], 0, now=status.set_at)
    assert all(not s.ready or s.score < 0.5 for s in fresh.scores)
    audit_dir = tmp_path / "audit"
    text = "".join(p.read_text() for p in sorted(audit_dir.glob("*.jsonl")))
    assert "forgiven by admin:op: detector state cleared" in text


def test_without_grace_lift_was_undone(start_server: Any, tmp_path: Path, sim_root: Path) -> None:
    # The attacker's test for item 4: with no grace period the lift is undone by the
    # next queries, so the grace period is what keeps it.
    running, issuer = _start(start_server, tmp_path, sim_root, lift_grace_s=0)
    rng = np.random.default_rng(11)
    rows = rng.uniform(0, 16, (400, 64)).astype(np.float32)
    quota = running.server.plane.guard.quota
    assert _flag(running, issuer, "mallory", rows) < 200
    quota.lift("mallory", reason="reviewed", set_by="admin:op")
    assert _flag(running, issuer, "mallory", rows[200:]) < 20
    assert quota.status("mallory").set_by == "detector"


@pytest.mark.parametrize("cohorts", ["default", "off"])
def test_sybils_below_min_queries_are_escalated_as_a_cohort(
    start_server: Any, tmp_path: Path, sim_root: Path, cohorts: str
) -> None:
    # 50 accounts x 19 uniform-noise rows: each below the distribution detector's
    # min_queries, so no account is ever judged on its own. The cohort view is on by
    # default; turned off, the blind spot is back (what the opt-out costs).
    extra = {} if cohorts == "default" else {"cohort_detection": False}
    running, issuer = _start(start_server, tmp_path, sim_root, **extra)
    rng = np.random.default_rng(19)
    answered, refused_accounts = 0, 0
    for n in range(50):
        with _client(running, issuer, f"sybil-{n}") as c:
            for _ in range(19):
                try:
                    c.infer("digits", {"input": rng.uniform(0, 16, (1, 64)).astype(np.float32)})
                    answered += 1
                except REFUSED:
                    refused_accounts += 1
                    break
    quota = running.server.plane.guard.quota
    if cohorts == "off":
        assert answered == 950 and refused_accounts == 0
        assert running.server.metrics.registry.get_sample_value(
            "sealserve_cohort_alerts_total") == 0  # fmt: skip
        return
    # Escalated before it completes: most of the 950 rows were never answered.
    assert answered < 950 // 2, answered
    assert refused_accounts >= 40
    late = quota.status("sybil-49")
    assert late.kind.value == "challenged" and "flagged cohort" in late.reason
    text = "".join(p.read_text() for p in sorted((tmp_path / "audit").glob("*.jsonl")))
    assert "cohort of young accounts" in text
    registry = running.server.metrics.registry  # and on /metrics
    assert (registry.get_sample_value("sealserve_cohort_alerts_total") or 0) >= 1


def test_young_honest_accounts_are_not_flagged_as_a_cohort(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)  # cohorts on by default
    x, _ = demo.holdout()
    quota = running.server.plane.guard.quota
    for n in range(30):
        with _client(running, issuer, f"newcomer-{n}") as c:
            for i in range(10):
                c.infer("digits", {"input": x[(n * 10 + i) % len(x)][None, :]})
        assert quota.status(f"newcomer-{n}").kind.value == "normal"


FLAGGED = ("challenged", "suspended")
COHORT = "\x00cohort/standard/digits"


def _sybil_flood(running: Any, issuer: TokenIssuer, rng: np.random.Generator, n: int) -> None:
    """``n`` fresh accounts send up to 19 uniform-noise rows each (no proof of work)."""
    for i in range(n):
        with _client(running, issuer, f"sybil-{rng.integers(1 << 30)}-{i}") as c:
            for _ in range(19):
                try:
                    c.infer("digits", {"input": rng.uniform(0, 16, (1, 64)).astype(np.float32)})
                except REFUSED:
                    break


def _flooded(
    start_server: Any, tmp: Path, sim_root: Path, rng: np.random.Generator
) -> tuple[Any, TokenIssuer, Any]:
    """A server whose young-account cohort the 50x19 sybil stream has just flagged."""
    running, issuer = _start(start_server, tmp, sim_root, cohort_detection=True)
    quota = running.server.plane.guard.quota
    _sybil_flood(running, issuer, rng, 50)
    assert quota.status(COHORT).kind.value in FLAGGED
    return running, issuer, quota


def _newcomer(running: Any, issuer: TokenIssuer, account: str, rows: np.ndarray) -> None:
    """An honest newcomer through the SDK, which answers challenges."""
    token = issuer.issue(account, tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)
    with Client(running.target, unsafe_plaintext=True, token=token) as c:
        for row in rows:
            c.infer("digits", {"input": row[None, :]})


def test_a_flagged_cohort_does_not_lock_out_honest_newcomers(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    # The attacker's test (issue 16, cohort DoS): 950 noise rows flag the cohort, whose
    # flag would hold 6 h and challenge every newcomer meanwhile. Honest newcomers
    # (natural digits, the SDK answering challenges) must step it down with their own
    # rows: within 200 natural rows the cohort challenges nobody, and no newcomer is held.
    running, issuer, quota = _flooded(start_server, tmp_path, sim_root, np.random.default_rng(19))
    x, _ = demo.holdout()
    challenged_at: list[int] = []
    for n in range(40):
        account = f"newcomer-{n}"
        rows = x[(n * 5) % len(x) :][:5]
        _newcomer(running, issuer, account, rows[:1])
        if n == 0:
            first = quota.status(account)
            assert first.kind.value == "challenged" and first.difficulty == 9, first
        _newcomer(running, issuer, account, rows[1:])
        mine = quota.status(account)
        # Cheap while it lasts (<= 2x the honest cost: docs/defenses.md), never held
        # past the newcomer's own natural rows.
        assert mine.kind.value == "normal", (n, mine)
        if quota.status(COHORT).kind.value in FLAGGED:
            challenged_at.append(n)
    # The cohort stepped down after at most 200 natural rows (40 newcomers x 5).
    assert quota.status(COHORT).kind.value not in FLAGGED
    assert len(challenged_at) * 5 <= 200, challenged_at
    # A newcomer now is not challenged at all.
    _newcomer(running, issuer, "late", x[:1])
    assert quota.status("late").kind.value == "normal"
    text = "".join(p.read_text() for p in sorted((tmp_path / "audit").glob("*.jsonl")))
    assert "graduated from the cohort" in text


def test_a_continuing_sybil_stream_keeps_the_cohort_flagged(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    rng = np.random.default_rng(23)
    running, issuer, quota = _flooded(start_server, tmp_path, sim_root, rng)
    x, _ = demo.holdout()
    for n in range(40):
        _newcomer(running, issuer, f"newcomer-{n}", x[(n * 5) % len(x) :][:5])
        _sybil_flood(running, issuer, rng, 1)  # one fresh sybil per newcomer
        assert quota.status(COHORT).kind.value in FLAGGED, n
    # The sybils keep their own escalation: one that pays the newcomers' cheap proof of
    # work is challenged at the full detection difficulty once its own rows are noise.
    _newcomer(running, issuer, "paying-sybil", rng.uniform(0, 16, (3, 64)).astype(np.float32))
    paying = quota.status("paying-sybil")
    assert paying.kind.value == "challenged" and paying.difficulty == DEFAULT_DIFFICULTY, paying
    assert "its own rows" in paying.reason
    assert quota.status("newcomer-39").kind.value == "normal"


def test_a_reserved_account_name_is_refused(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    x, _ = demo.holdout()
    with _client(running, issuer, "\x00cohort/standard/digits") as c:
        with pytest.raises(PermissionDeniedError, match="may not start with a NUL"):
            c.infer("digits", {"input": x[:1]})


def test_honest_newcomers_who_pay_challenges_are_answered_and_the_cost_is_measured(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    # The theft bench's honest users (bench/THEFT.md): right after the sybil stream,
    # newcomers that do not pay challenges are refused; newcomers that pay them as the
    # SDK does are all answered, and what they paid is reported, not hidden.
    from sealserve.redteam.metrics import Evaluation, honest_utility

    running, issuer, _ = _flooded(start_server, tmp_path, sim_root, np.random.default_rng(23))

    def tokens(tag: str, n: int) -> list[str | None]:
        return [issuer.issue(f"{tag}-{i}", tier="standard", scopes=["infer"],
                             tos_version=TOS, ttl=600) for i in range(n)]  # fmt: skip

    plain = {"unsafe_plaintext": True}
    ev = Evaluation.demo()
    unpaid = honest_utility(running.target, tokens("unpaid", 5), ev, per_account=3, rate=20,
                            client_kwargs=plain)  # fmt: skip
    assert unpaid.refused_accounts == unpaid.challenged_accounts > 0
    assert unpaid.paid_accounts == 0 and unpaid.pow_hashes == 0
    paid = honest_utility(running.target, tokens("paid", 10), ev, per_account=6, rate=20,
                          client_kwargs=plain, pay_challenges=True)  # fmt: skip
    assert paid.answered == paid.queries == 60 and paid.refused_accounts == 0
    assert paid.challenged_accounts == paid.paid_accounts > 0
    assert paid.pow_hashes >= paid.paid_accounts and paid.pow_seconds > 0
    assert paid.cost_ratio is not None and paid.cost_ratio > 1.0 and paid.base_ms
