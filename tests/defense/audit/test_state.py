"""Refusals in the log (bounded, exact), sealed-state versions bound into the chain (a
rolled-back ledger is detected at start and by `audit verify --sealed-state`), and
statuses re-applied from the log when the state store lost them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sealserve.cli.main import main
from sealserve.defense.audit.log import AuditKey, AuditLog, log_files
from sealserve.defense.audit.refusals import RefusalCounter, refusal_reason
from sealserve.defense.audit.report import summarize_accounts
from sealserve.defense.audit.state import (
    LEDGER,
    check_sealed_files,
    reapply_statuses,
    record_status,
    unwrap_versioned,
    wrap_versioned,
)
from sealserve.defense.audit.verify import read_records, verify_audit_log
from sealserve.defense.challenge import Challenges
from sealserve.defense.limits import LimitsConfig
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import Status
from sealserve.defense.store.memory import MemoryStore
from sealserve.errors import (
    AuditError,
    ChallengeRequiredError,
    RateLimitedError,
    SuspendedError,
)


@pytest.fixture
def key() -> AuditKey:
    return AuditKey.generate()


def _records(path: Path) -> list[dict[str, object]]:
    return list(read_records(log_files(path)))


def test_refusal_reasons() -> None:
    assert refusal_reason(RateLimitedError("x")) == "rate_limit"
    assert refusal_reason(SuspendedError("x")) == "suspended"
    assert refusal_reason(ChallengeRequiredError("x")) == "challenge"


def test_a_flood_of_refusals_is_bounded_and_counted_exactly(tmp_path: Path, key: AuditKey) -> None:
    counter = RefusalCounter(threshold=5, interval_s=60.0)
    log = AuditLog.open(tmp_path, key, checkpoint_every=10_000, fsync=False, refusals=counter,
                        now=0.0)  # fmt: skip
    sent = 0
    for i in range(10_000):  # 10,000 refusals in 100 s: two intervals
        t = i * 0.01
        detail = "account per_minute quota of 5 requests exhausted" if i % 2 else "suspended"
        log.append_refusal_at_time(t, account="flood", model="m", reason="rate_limit",
                                   detail=detail, rows=2)  # fmt: skip
        sent += 1
    log.append_refusal_at_time(100.0, account="other", model="m", reason="suspended",
                               detail="account is suspended")  # fmt: skip
    sent += 1
    log.close_at_time(101.0)
    records = _records(tmp_path)
    refusal_records = [r for r in records if r["kind"] in ("refusal", "refusals")]
    # Two intervals x (5 single + 2 aggregates: one per detail) + 1 for "other".
    assert len(refusal_records) == 2 * (5 + 2) + 1
    summary = {a.account: a for a in summarize_accounts(records)}
    assert summary["flood"].refused + summary["other"].refused == sent
    assert sum(int(r.get("rows", 0)) for r in refusal_records  # type: ignore[call-overload]
               if r["account"] == "flood") == 2 * 10_000  # fmt: skip
    assert verify_audit_log(log_files(tmp_path), trusted_public_keys=[key.public_bytes]).ok


def test_refusal_counter_bounds_its_memory() -> None:
    counter = RefusalCounter(threshold=0, interval_s=1e9, max_accounts=100)
    flushed = 0
    for i in range(1000):
        due, own = counter.note(float(i), account=f"a{i}", model="m", reason="rate_limit",
                                detail="d", rows=1)  # fmt: skip
        assert own is None
        flushed += sum(int(r["count"]) for r in due)
    flushed += sum(int(r["count"]) for r in counter.drain())
    assert flushed == 1000 and len(counter._windows) == 0


def test_versioned_payload_roundtrip() -> None:
    assert unwrap_versioned(wrap_versioned(7, b"ledger")) == (7, b"ledger")
    assert unwrap_versioned(b"old-ledger-bytes") == (0, b"old-ledger-bytes")


def _cfg(tmp_path: Path) -> object:
    from sealserve.server.defenses import DefenseConfig

    return DefenseConfig.parse(
        {"state_dir": str(tmp_path / "state"), "audit": {"dir": str(tmp_path / "audit")}}
    ).relative_to(tmp_path)


def _start(tmp_path: Path, sim_root: Path) -> tuple[object, AuditLog]:
    """What the server does at start: open sealed state and the log, bind them."""
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.server.defenses import DefenseSecrets, bind_audit_state

    cfg = _cfg(tmp_path)
    platform = SimulatedPlatform(sim_root, measurement=b"\x11" * 48)
    secrets = DefenseSecrets.open(cfg, platform)  # type: ignore[arg-type]
    assert secrets.audit_key is not None
    audit = AuditLog.open(tmp_path / "audit", secrets.audit_key, fsync=False)
    bind_audit_state(cfg, secrets, audit, None)  # type: ignore[arg-type]
    return secrets, audit


def test_rolled_back_ledger_is_detected_at_start_and_by_verify(
    tmp_path: Path, sim_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets, audit = _start(tmp_path, sim_root)
    ledger_file = tmp_path / "state" / LEDGER
    secrets.save_ledger()  # type: ignore[attr-defined]
    shutil.copy(ledger_file, tmp_path / "old-copy")
    secrets.save_ledger()  # type: ignore[attr-defined]
    secrets.save_ledger()  # type: ignore[attr-defined]
    assert secrets.ledger_version == 3  # type: ignore[attr-defined]
    audit.close()
    pub = tmp_path / "state" / "audit-public.pem"
    args = ["audit", "verify", str(tmp_path / "audit"), "--public-key", str(pub),
            "--sealed-state", str(tmp_path / "state")]  # fmt: skip
    assert main(args) == 0
    # Someone with disk access puts the older ledger back (erasing later marks).
    shutil.copy(tmp_path / "old-copy", ledger_file)
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "is version 1 but the log recorded version 3 later: it was rolled back" in out
    # The server notices at start, says so in a signed alarm, and verify fails on it.
    secrets2, audit2 = _start(tmp_path, sim_root)
    assert secrets2.ledger_version == 1  # type: ignore[attr-defined]
    audit2.close()
    alarms = [r for r in _records(tmp_path / "audit") if r["kind"] == "alarm"]
    assert len(alarms) == 1 and "version 1 but the log recorded version 3" in str(alarms[0])
    with pytest.raises(AuditError, match="the server raised an alarm: sealed state rolled back"):
        verify_audit_log(log_files(tmp_path / "audit"),
                         trusted_public_keys=[secrets2.audit_key.public_bytes])  # type: ignore[attr-defined]  # fmt: skip


def test_ledger_newer_than_the_log_is_no_alarm(tmp_path: Path, sim_root: Path) -> None:
    secrets, audit = _start(tmp_path, sim_root)
    secrets.save_ledger()  # type: ignore[attr-defined]  # version 1, recorded
    audit.close()  # the server died between writing the ledger and recording it:
    secrets.save_ledger()  # type: ignore[attr-defined]  # version 2, not recorded
    problems = check_sealed_files(_records(tmp_path / "audit"), tmp_path / "state")
    assert len(problems) == 1 and not problems[0][0]
    assert "matches no version the log recorded (last: 1)" in problems[0][1]
    secrets2, audit2 = _start(tmp_path, sim_root)  # records version 2 now
    assert secrets2.ledger_version == 2  # type: ignore[attr-defined]
    audit2.close()
    assert check_sealed_files(_records(tmp_path / "audit"), tmp_path / "state") == []
    assert not [r for r in _records(tmp_path / "audit") if r["kind"] == "alarm"]


def _quota() -> QuotaGuard:
    store = MemoryStore()
    cfg = LimitsConfig.from_mapping({"tiers": {"free": {"per_day": 100}}})
    return QuotaGuard(cfg, store, Challenges(Challenges.generate_key(), store))


def test_statuses_the_store_lost_are_reapplied_from_the_log(tmp_path: Path, key: AuditKey) -> None:
    log = AuditLog.open(tmp_path, key, fsync=False, now=1000.0)
    q = _quota()
    for account, make in (
        ("op-suspended", lambda: q.suspend("op-suspended", reason="fraud", set_by="admin:ops",
                                           now=1000.0)),
        ("expired", lambda: q.suspend("expired", reason="x", set_by="admin:ops", ttl_s=10,
                                      now=1000.0)),
        ("throttled", lambda: q.throttle("throttled", 0.25, reason="y", set_by="admin:ops",
                                         ttl_s=3600, now=1000.0)),
        ("lifted", lambda: q.suspend("lifted", reason="z", set_by="admin:ops", now=1000.0)),
    ):  # fmt: skip
        record_status(log, account, make(), previous="normal", now=1000.0)
    record_status(log, "lifted", q.lift("lifted", reason="ok", set_by="admin:ops", now=1001.0),
                  previous="suspended", now=1001.0)  # fmt: skip
    # Detector decisions are recorded by the release pipeline in the policy's words.
    log.append_status_change_at_time(1002.0, account="thief", model="digits", previous="ok",
                                     status="challenge", expires_at=None, reason="score 0.9")  # fmt: skip
    log.close_at_time(1003.0)
    fresh = _quota()  # a state store that lost everything
    again = AuditLog.open(tmp_path, key, fsync=False, now=2000.0)
    done = reapply_statuses(again, fresh, now=2000.0, throttle_factor=0.1, challenge_difficulty=18)
    assert sorted(done) == ["op-suspended", "thief", "throttled"]
    s = fresh.status("op-suspended", now=2000.0)
    assert s.kind is Status.SUSPENDED and s.set_by == "admin:ops"
    assert "re-applied from the audit log" in s.reason and "fraud" in s.reason
    t = fresh.status("throttled", now=2000.0)
    assert t.kind is Status.THROTTLED and t.factor == 0.25
    assert t.expires_at is not None and abs(t.expires_at - 4600.0) < 1e-6
    c = fresh.status("thief", now=2000.0)
    assert c.kind is Status.CHALLENGED and c.difficulty == 18
    assert fresh.status("expired", now=2000.0).kind is Status.NORMAL
    assert fresh.status("lifted", now=2000.0).kind is Status.NORMAL
    # A store that kept its statuses is left alone; the re-application is logged.
    assert reapply_statuses(again, fresh, now=2001.0, throttle_factor=0.1,
                            challenge_difficulty=18) == []  # fmt: skip
    again.close_at_time(2002.0)
    reapplied = [r for r in _records(tmp_path) if r["kind"] == "status"
                 and "re-applied" in str(r["reason"])]  # fmt: skip
    assert len(reapplied) == 3
    assert json.loads(json.dumps(reapplied[0]))["set_by"] in ("admin:ops", "detector")
