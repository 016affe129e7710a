"""The audit log through the server: every refusal a client saw is in the log (and in
`audit report`'s refused column), operators' status changes are recorded, and the
signed head is served to auditors (Audit.GetHead) and beside attestation evidence."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sealserve import demo
from sealserve._proto import admin_pb2, admin_pb2_grpc, audit_pb2, audit_pb2_grpc
from sealserve._proto import attestation_pb2 as apb
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.defense.audit.head import AuditHead, head_public_key
from sealserve.defense.audit.log import AuditLog, log_files, public_key_fingerprint
from sealserve.defense.audit.report import summarize_accounts
from sealserve.defense.audit.verify import read_records, verify_audit_log
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)

ISS, AUD, TOS = "https://issuer.test.invalid", "sealserve-test", "2026-11"
THRESHOLD = 3


def _settings(tmp_path: Path, sim_root: Path) -> dict[str, Any]:
    pem, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    (tmp_path / "issuer.pem").write_bytes(pem)
    auth = {"audience": AUD, "required_tos_version": TOS,
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp_path / "jwks.json")}]}  # fmt: skip
    return dict(
        model_repository=demo.repository(),
        unsafe_plaintext=True,
        auth=auth,
        attestation_platform="simulated",
        simulated_platform_dir=sim_root,
        state_store="memory:",
        limits={"tiers": {"standard": {"rate": 1000, "burst": 1000, "per_minute": 10}}},
        defense={
            "state_dir": str(tmp_path / "state"),
            "audit": {"dir": str(tmp_path / "audit"), "checkpoint_every": 50,
                      "refusals_per_interval": THRESHOLD},
            "models": {"digits": {"output": "probabilities", "label": "label",
                                  "profile": "none", "detection": False}},
        },
    )  # fmt: skip


@pytest.fixture
def limited(start_server: Any, tmp_path: Path, sim_root: Path) -> tuple[Any, TokenIssuer]:
    running = start_server(**_settings(tmp_path, sim_root))
    pem = (tmp_path / "issuer.pem").read_bytes()
    return running, TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)


def _token(issuer: TokenIssuer, account: str, scopes: list[str]) -> str:
    return issuer.issue(account, tier="standard", scopes=scopes, tos_version=TOS, ttl=600)


def _send(running: Any, token: str, n: int) -> Counter[str]:
    """``n`` one-row requests; what the client saw, by outcome."""
    seen: Counter[str] = Counter()
    x = np.zeros((1, 64), np.float32)
    with Client(running.target, unsafe_plaintext=True, token=token,
                solve_challenges=False) as client:  # fmt: skip
        for _ in range(n):
            try:
                client.infer("digits", {"input": x})
                seen["answered"] += 1
            except (
                RateLimitedError,
                ChallengeRequiredError,
                PermissionDeniedError,
                SuspendedError,
            ) as exc:
                seen[type(exc).__name__] += 1
    return seen


def test_report_refused_column_equals_the_refusals_clients_saw(
    limited: Any, tmp_path: Path
) -> None:
    running, issuer = limited
    # An operator suspends one account through the Admin service.
    with grpc.insecure_channel(running.target) as channel:
        admin_pb2_grpc.AdminStub(channel).SetStatus(
            admin_pb2.SetStatusRequest(account="banned", status="suspended", reason="abuse"),
            metadata=(("authorization", f"Bearer {_token(issuer, 'op', ['admin'])}"),),
            timeout=10,
        )
    running.server.plane.guard.quota.challenge("puzzled", 20, reason="t", set_by="test")
    seen = {
        "greedy": _send(running, _token(issuer, "greedy", ["infer"]), 40),
        "banned": _send(running, _token(issuer, "banned", ["infer"]), 6),
        "puzzled": _send(running, _token(issuer, "puzzled", ["infer"]), 5),
    }
    assert seen["greedy"] == {"answered": 10, "RateLimitedError": 30}
    assert seen["banned"]["answered"] == 0 and seen["puzzled"]["answered"] == 0
    audit = running.server.plane.guard.output.audit
    audit.close_at_time(time.time())  # what shutdown does: pending aggregates are written
    files = log_files(tmp_path / "audit")
    pub = running.server.defense_secrets.audit_key.public_bytes
    assert verify_audit_log(files, trusted_public_keys=[pub]).ok
    records = list(read_records(files))
    summaries = {a.account: a for a in summarize_accounts(records)}
    for account, outcomes in seen.items():
        refused = sum(n for k, n in outcomes.items() if k != "answered")
        assert summaries[account].refused == refused, account
        assert summaries[account].queries == outcomes["answered"], account
    assert summaries["greedy"].refused_by == {"rate_limit": 30}
    assert summaries["banned"].refused_by == {"suspended": 6}
    assert summaries["puzzled"].refused_by == {"challenge": 5}
    # Bounded: beyond the threshold the flood is one aggregate record, which says so.
    greedy = [r for r in records if r.get("account") == "greedy"
              and r["kind"] in ("refusal", "refusals")]  # fmt: skip
    assert [r["kind"] for r in greedy] == ["refusal"] * THRESHOLD + ["refusals"]
    assert greedy[-1]["count"] == 30 - THRESHOLD and "added up" in greedy[-1]["aggregated"]
    assert "per_minute" in greedy[0]["detail"] or "minute" in greedy[0]["detail"]
    # The operator's change is in the log, with who made it.
    op = [r for r in records if r["kind"] == "status" and r["account"] == "banned"]
    assert op and op[-1]["status"] == "suspended" and op[-1]["set_by"] == "admin:op"


def test_get_head_needs_the_audit_scope_and_is_signed(limited: Any, tmp_path: Path) -> None:
    running, issuer = limited
    _send(running, _token(issuer, "someone", ["infer"]), 2)
    nonce = os.urandom(32)
    with grpc.insecure_channel(running.target) as channel:
        stub = audit_pb2_grpc.AuditStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetHead(audit_pb2.GetHeadRequest(nonce=nonce), timeout=10, metadata=(
                ("authorization", f"Bearer {_token(issuer, 'u', ['infer'])}"),))  # fmt: skip
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        md = (("authorization", f"Bearer {_token(issuer, 'auditor', ['audit'])}"),)
        with pytest.raises(grpc.RpcError) as bad:
            stub.GetHead(audit_pb2.GetHeadRequest(nonce=b"n" * 65), metadata=md, timeout=10)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "nonce is 65 bytes; at most 64" in (bad.value.details() or "")
        reply = stub.GetHead(audit_pb2.GetHeadRequest(nonce=nonce), metadata=md, timeout=10)
    head = AuditHead.from_json(reply.head)
    assert head.key == running.server.runtime_keys.audit_fingerprint
    head.verify({head.key: head_public_key(head)}, nonce=nonce.hex())
    audit = running.server.plane.guard.output.audit
    assert head.seq <= audit.head()[0]
    audit.close_at_time(time.time())
    # The head pins the log an auditor checks later.
    report = verify_audit_log(
        log_files(tmp_path / "audit"), trusted_public_keys=[head_public_key(head)],
        expect_head=head,
    )  # fmt: skip
    assert report.ok and report.last_seq is not None and report.last_seq >= head.seq
    # What the server created is private to it.
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in log_files(tmp_path / "audit")} == {0o600}


def test_evidence_carries_a_head_for_the_same_nonce(limited: Any, sim_root: Path) -> None:
    from sealserve.enclave.manifest import code_digest
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.server.grpc.attestation_service import AttestationServicer
    from sealserve.server.manifest import simulated_measurement

    running, _ = limited
    servicer = AttestationServicer(
        SimulatedPlatform(sim_root, measurement=simulated_measurement(code_digest())),
        tls_spki=b"spki", manifest=running.server.manifest.to_bytes(), hpke_public_key=b"h" * 32,
        runtime_keys=running.server.runtime_keys.to_bytes(), audit_head=running.server.audit_head,
    )  # fmt: skip
    nonce = os.urandom(32)

    class _Ctx:  # the one thing GetEvidence reads from its context: the peer (its rate)
        def peer(self) -> str:
            return "ipv4:127.0.0.1:5555"

    reply = asyncio.run(servicer.GetEvidence(apb.GetEvidenceRequest(nonce=nonce), _Ctx()))  # type: ignore[arg-type]
    assert reply.evidence
    head = AuditHead.from_json(reply.audit_head)
    # The runtime keys record (bound into the report) holds the key; the head carries it.
    evidence = Evidence.from_bytes(reply.evidence)
    record = RuntimeKeys.from_bytes(evidence.runtime_keys)
    assert head_public_key(head) == record.audit_public_key
    assert public_key_fingerprint(head_public_key(head)) == record.audit_fingerprint
    head.verify({head.key: head_public_key(head)}, nonce=nonce.hex())


def test_audit_head_command_writes_a_head_that_verify_accepts(
    limited: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sealserve.cli.main import main

    running, issuer = limited
    _send(running, _token(issuer, "someone", ["infer"]), 3)
    (tmp_path / "audit.token").write_text(_token(issuer, "auditor", ["audit"]))
    out = tmp_path / "head.json"
    assert main(["audit", "head", "--target", running.target, "--plaintext",
                 "--token-file", str(tmp_path / "audit.token"), "-o", str(out)]) == 0  # fmt: skip
    assert f"wrote {out}: seq " in capsys.readouterr().out
    running.server.plane.guard.output.audit.close_at_time(time.time())
    pem = tmp_path / "state" / "audit-public.pem"
    assert main(["audit", "verify", str(tmp_path / "audit"), "--public-key", str(pem),
                 "--expect-head", str(out)]) == 0  # fmt: skip


def test_server_starts_on_a_torn_audit_tail_and_reports_it(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    from sealserve.enclave.manifest import code_digest
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.server.defenses import DefenseConfig, DefenseSecrets
    from sealserve.server.manifest import simulated_measurement

    settings = _settings(tmp_path, sim_root)
    cfg = DefenseConfig.parse(settings["defense"]).relative_to(tmp_path)
    platform = SimulatedPlatform(sim_root, measurement=simulated_measurement(code_digest()))
    key = DefenseSecrets.open(cfg, platform).audit_key
    assert key is not None
    # A previous run that died mid-write: unsigned records and a torn last one.
    crashed = AuditLog.open(tmp_path / "audit", key, checkpoint_every=50, fsync=False)
    for i in range(7):
        crashed.append_key_release_at_time(float(i), model="digits", key_id="k", outcome="ok")
    f = crashed.current_path
    f.write_bytes(f.read_bytes()[:-9])
    running = start_server(**settings)
    audit = running.server.plane.guard.output.audit
    assert audit.recovery["torn_file"] == f.name + ".torn-1"
    assert audit.recovery["recovered"] == 7 and "mac_failures" not in audit.recovery
    audit.close_at_time(time.time())
    report = verify_audit_log(log_files(tmp_path / "audit"), trusted_public_keys=[key.public_bytes])
    assert report.ok
    assert any("a torn last record" in w for w in report.warnings)
    assert (tmp_path / "audit" / (f.name + ".torn-1")).stat().st_size > 0
