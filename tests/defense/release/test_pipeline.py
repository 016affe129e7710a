"""Detectors + policy + audit log wired together the way the guard will do it: an
extraction account is flagged and throttled, the honest one keeps being served, and
the signed log records why."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sealserve.defense.audit.log import AuditKey, AuditLog, digest_array, log_files
from sealserve.defense.audit.report import summarize_accounts
from sealserve.defense.audit.verify import read_records, verify_audit_log
from sealserve.defense.detect import MemoryBlobStore
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.status import AccountStatus, Status
from tests.defense.streams import digits_task, honest_stream, uniform_stream
from tests.defense.test_detection_digits import make_suite


def test_flag_and_throttle_story(tmp_path: Path) -> None:
    task = digits_task()
    rng = np.random.default_rng(5)
    store = MemoryBlobStore()
    suite = make_suite(store)
    policy = ResponsePolicy.default()
    key = AuditKey.generate()
    log = AuditLog.open(tmp_path, key, checkpoint_every=100, fsync=False, now=0.0)
    statuses = {"honest": AccountStatus(), "attacker": AccountStatus()}
    streams = {
        "honest": honest_stream(task.split_b, task.predict(task.split_b), 300, rng),
        "attacker": uniform_stream(300, rng),
    }
    served = {"honest": 0, "attacker": 0}
    for i in range(300):
        for account, xs in streams.items():
            now = 10.0 + i
            if statuses[account].effective_at_time(now) >= Status.THROTTLED:
                continue  # the guard refuses before inference
            x = xs[i]
            probs = task.model.predict_proba(x[None, :])[0]
            label = int(np.argmax(probs))
            result = suite.observe_at_time(account, "digits", x, label, now=now)
            decision = policy.decide_at_time(statuses[account], result.scores, now=now)
            served[account] += 1
            log.append_query_at_time(
                now,
                account=account,
                model="digits",
                input_sha256=digest_array(x),
                output_sha256=digest_array(probs),
                decision=decision.status.label,
                flags=result.flags(),
            )
            if decision.write:
                statuses[account] = AccountStatus.make(
                    decision.status, expires_at=decision.expires_at
                )
            if decision.changed:
                log.append_status_change_at_time(
                    now,
                    account=account,
                    model="digits",
                    previous=decision.previous.label,
                    status=decision.status.label,
                    expires_at=decision.expires_at,
                    reason=decision.reason,
                )
    log.close_at_time(400.0)
    assert served["honest"] == 300
    assert served["attacker"] <= 25 and statuses["attacker"].kind >= Status.THROTTLED
    report = verify_audit_log(log_files(tmp_path), trusted_public_keys=[key.public_bytes])
    assert report.ok
    records = list(read_records(log_files(tmp_path)))
    change = next(r for r in records if r["kind"] == "status")
    assert change["account"] == "attacker" and "Distribution:" in change["reason"]
    summary = {a.account: a for a in summarize_accounts(records)}
    assert summary["attacker"].max_score >= 0.5 > summary["honest"].max_score
    assert summary["attacker"].top_detector == "distribution"
    assert summary["honest"].status == "ok"
