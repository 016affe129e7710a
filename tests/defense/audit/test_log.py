"""Audit log: chain, signed checkpoints, rotation, resume, and tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sealserve.canonical import canonical_json
from sealserve.defense.audit.log import (
    AuditKey,
    AuditLog,
    digest_array,
    encode_record,
    load_public_key,
    log_files,
    sha256_hex,
)
from sealserve.defense.audit.verify import check_audit_log, verify_audit_log
from sealserve.errors import AuditError, ConfigError


def write_log(
    directory: Path, key: AuditKey, n: int = 12, *, every: int = 5, rotate_at: int | None = None
) -> list[Path]:
    log = AuditLog.open(directory, key, checkpoint_every=every, fsync=False, now=0.0)
    for i in range(n):
        log.append_query_at_time(
            float(i + 1),
            account=f"acct-{i % 3}",
            model="digits",
            input_sha256=digest_array(np.full(64, i, np.float32)),
            output_sha256=sha256_hex(b"out%d" % i),
            decision="ok",
            flags={"prada": 0.1, "distribution": 0.2},
        )
        if rotate_at is not None and i == rotate_at:
            log.rotate_at_time(float(i + 1))
    log.append_status_change_at_time(
        100.0,
        account="acct-1",
        model="digits",
        previous="ok",
        status="throttle",
        expires_at=3700.0,
        reason="escalated to throttle: score 0.55 >= 0.5; Distribution: ...",
    )
    log.append_key_release_at_time(101.0, model="digits", key_id="k1", outcome="released")
    log.close_at_time(102.0)
    return log_files(directory)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def key() -> AuditKey:
    return AuditKey.generate()


def verify(files: list[Path], key: AuditKey) -> None:
    verify_audit_log(files, trusted_public_keys=[key.public_bytes])


def test_intact_log_verifies_and_holds_no_raw_input(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    report = verify_audit_log(files, trusted_public_keys=[key.public_bytes])
    assert report.ok and report.records == 19 and report.checkpoints == 4
    assert report.first_seq == 0 and report.last_seq == report.last_signed_seq == 18
    assert report.key_fingerprints == (key.fingerprint,)
    assert "audit log OK: 19 records" in report.summary()
    records = [json.loads(x) for x in lines(files[0])]
    assert [r["seq"] for r in records] == list(range(19))
    kinds = {r["kind"] for r in records}
    assert kinds == {"open", "query", "checkpoint", "status", "key_release"}
    q = next(r for r in records if r["kind"] == "query")
    assert set(q) == {
        "_mac",
        "v",
        "seq",
        "time",
        "kind",
        "prev",
        "account",
        "model",
        "input_sha256",
        "output_sha256",
        "decision",
        "flags",
        "protocol",
    }
    for raw in lines(files[0]):
        assert raw.rstrip(b"\n") == canonical_json(json.loads(raw))


def test_raw_inputs_are_refused(tmp_path: Path, key: AuditKey) -> None:
    log = AuditLog.open(tmp_path, key, fsync=False, now=0.0)
    with pytest.raises(ConfigError, match="input_sha256 must be a lowercase hex SHA-256"):
        log.append_query_at_time(
            1.0,
            account="a",
            model="m",
            input_sha256="1,2,3",
            output_sha256="0" * 64,
            decision="ok",
            flags={},
        )
    with pytest.raises(ConfigError, match="written by the log itself"):
        log.append_at_time(1.0, "checkpoint", {})
    with pytest.raises(ConfigError, match=r"fields \['seq'\] are reserved"):
        log.append_at_time(1.0, "note", {"seq": 5})
    log.close_at_time(2.0)


def test_removed_record_names_it(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    body = lines(files[0])
    del body[3]  # seq 3
    files[0].write_bytes(b"".join(body))
    with pytest.raises(
        AuditError, match=r"audit-000001.jsonl:4: record 4: seq 4 where 3 was expected"
    ) as e:
        verify(files, key)
    assert e.value.line == 4 and e.value.seq == 4 and "removed" in e.value.problem


def test_reordered_records_name_them(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    body = lines(files[0])
    body[2], body[3] = body[3], body[2]
    files[0].write_bytes(b"".join(body))
    with pytest.raises(AuditError, match=r":3: record 3: seq 3 where 2 was expected: .*reordered"):
        verify(files, key)


def test_edited_record_names_it(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    body = lines(files[0])
    rec = json.loads(body[2])
    rec["account"] = "someone-else"
    body[2] = canonical_json(rec) + b"\n"
    files[0].write_bytes(b"".join(body))
    with pytest.raises(
        AuditError, match=r":3: record 2: record was edited: its SHA-256 does not match"
    ) as e:
        verify(files, key)
    assert e.value.seq == 2


def test_edit_by_hand_is_not_canonical(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    body = lines(files[0])
    body[4] = body[4].replace(b'"decision":"ok"', b'"decision": "ok"')
    files[0].write_bytes(b"".join(body))
    with pytest.raises(AuditError, match=r":5: record 4: record is not in canonical form"):
        verify(files, key)


def test_rechained_edit_breaks_the_checkpoint_signature(tmp_path: Path, key: AuditKey) -> None:
    """An attacker who recomputes every later hash still cannot re-sign."""
    files = write_log(tmp_path, key)
    recs = [json.loads(x) for x in lines(files[0])]
    recs[2]["decision"] = "refused"
    out, prev = [], "0" * 64
    for r in recs:
        r["prev"] = prev
        line = canonical_json(r)
        prev = sha256_hex(line)
        out.append(line + b"\n")
    files[0].write_bytes(b"".join(out))
    with pytest.raises(AuditError, match=r":6: record 5: checkpoint signature does not verify"):
        verify(files, key)


def test_appended_after_checkpoint_names_the_record(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    body = lines(files[0])
    last = json.loads(body[-1])
    forged = {
        "v": 2,
        "seq": last["seq"] + 1,
        "time": 200.0,
        "kind": "query",
        "prev": sha256_hex(body[-1].rstrip(b"\n")),
        "account": "x",
        "model": "digits",
        "input_sha256": "0" * 64,
        "output_sha256": "0" * 64,
        "decision": "ok",
        "flags": {},
    }
    # A forger lacks the MAC key: the MAC is one made under another key.
    files[0].write_bytes(b"".join(body) + encode_record(forged, b"k" * 32) + b"\n")
    with pytest.raises(
        AuditError,
        match=r":20: record 19: 1 record\(s\) from here on follow the last signed checkpoint "
        r"\(seq 18\)",
    ):
        verify(files, key)
    # The server (holding the MAC key) sees the forgery itself.
    with pytest.raises(AuditError, match=r":20: record 19: record's MAC does not verify"):
        verify_audit_log(files, trusted_public_keys=[key.public_bytes], mac_key=key.mac_key)
    report = check_audit_log(
        files, trusted_public_keys=[key.public_bytes], allow_unsigned_tail=True
    )
    assert report.ok and report.unsigned_tail == 1
    assert "record 19" in report.warnings[0]


def test_untrusted_key_and_forged_checkpoint(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    other = AuditKey.generate()
    with pytest.raises(AuditError, match=r":6: record 5: checkpoint signed by an untrusted key"):
        verify_audit_log(files, trusted_public_keys=[other.public_bytes])
    with pytest.raises(ConfigError, match="at least one trusted public key"):
        verify_audit_log(files, trusted_public_keys=[])


def test_truncated_and_garbage_lines(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key)
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-10])
    with pytest.raises(AuditError, match=r":19: record: incomplete last line"):
        verify(files, key)
    files[0].write_bytes(data.replace(data.splitlines()[1], b"garbage", 1))
    with pytest.raises(AuditError, match=r":2: record: not valid JSON"):
        verify(files, key)


def test_rotation_keeps_the_chain_and_detects_a_missing_file(tmp_path: Path, key: AuditKey) -> None:
    files = write_log(tmp_path, key, n=20, every=100, rotate_at=9)
    assert [f.name for f in files] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    first = json.loads(lines(files[1])[0])
    assert first["kind"] == "rotate" and first["previous_file"] == "audit-000001.jsonl"
    assert first["prev"] == sha256_hex(lines(files[0])[-1].rstrip(b"\n"))
    assert json.loads(lines(files[0])[-1])["kind"] == "checkpoint"  # each file ends signed
    report = verify_audit_log(files, trusted_public_keys=[key.public_bytes])
    assert report.ok and len(report.files) == 2
    # The later file alone fails: the first file is missing (deleted by whoever cut it).
    with pytest.raises(
        AuditError,
        match=r"audit-000002.jsonl:1: record 12: the log starts at seq 12, not "
        r"with its open record \(seq 0\): its first file\(s\) are missing",
    ):
        verify(files[1:], key)
    # ... and verifies with a warning when left out on purpose (a signed boundary).
    alone = verify_audit_log(
        files[1:], trusted_public_keys=[key.public_bytes], allow_missing_start=True
    )
    assert "earlier records were not supplied" in alone.warnings[0]
    # Files in the wrong order: the chain breaks at the first record of the second.
    with pytest.raises(
        AuditError, match=r"audit-000001.jsonl:1: record 0: seq 0 where .* a file is missing"
    ):
        verify_audit_log(
            [files[1], files[0]], trusted_public_keys=[key.public_bytes], allow_missing_start=True
        )


def test_size_based_rotation_and_resume(tmp_path: Path, key: AuditKey) -> None:
    log = AuditLog.open(tmp_path, key, checkpoint_every=50, max_file_bytes=4096, fsync=False, now=0)
    for i in range(40):
        log.append_query_at_time(
            float(i),
            account="a",
            model="m",
            input_sha256="a" * 64,
            output_sha256="b" * 64,
            decision="ok",
            flags={},
        )
    log.close_at_time(50.0)
    resumed = AuditLog.open(tmp_path, key, checkpoint_every=50, fsync=False, now=60.0)
    resumed.append_query_at_time(
        61.0,
        account="a",
        model="m",
        input_sha256="a" * 64,
        output_sha256="b" * 64,
        decision="ok",
        flags={},
    )
    resumed.close_at_time(62.0)
    files = log_files(tmp_path)
    assert len(files) >= 3
    report = verify_audit_log(files, trusted_public_keys=[key.public_bytes])
    assert report.ok and report.last_seq == report.last_signed_seq


def test_time_based_checkpoint_and_timer(tmp_path: Path, key: AuditKey) -> None:
    log = AuditLog.open(
        tmp_path, key, checkpoint_every=1000, checkpoint_interval_s=10, fsync=False, now=0
    )
    log.append_key_release_at_time(1.0, model="m", key_id="k", outcome="released")
    assert not log.maybe_checkpoint_at_time(5.0)
    assert log.maybe_checkpoint_at_time(11.0)
    log.append_key_release_at_time(30.0, model="m", key_id="k", outcome="released")  # >10 s
    kinds = [json.loads(x)["kind"] for x in lines(log.current_path)]
    assert kinds == ["open", "key_release", "checkpoint", "key_release", "checkpoint"]
    log.close_at_time(31.0)
    with pytest.raises(AuditError, match="closed"):
        log.rotate_at_time(32.0)


def test_resume_refuses_a_log_without_a_complete_record(tmp_path: Path, key: AuditKey) -> None:
    (tmp_path / "audit-000001.jsonl").write_bytes(b'{"_mac":"00')
    with pytest.raises(AuditError, match="holds no complete record; cannot continue"):
        AuditLog.open(tmp_path, key, fsync=False)
    assert (tmp_path / "audit-000001.jsonl.torn-1").read_bytes() == b'{"_mac":"00'


def test_audit_key_roundtrip_and_public_key_forms(key: AuditKey) -> None:
    again = AuditKey.from_private_bytes(key.to_private_bytes())
    assert again.public_bytes == key.public_bytes and again.fingerprint == key.fingerprint
    assert key.fingerprint == "sha256:" + sha256_hex(key.public_bytes)
    assert load_public_key(key.public_key_pem()) == key.public_bytes
    assert load_public_key(key.public_bytes.hex()) == key.public_bytes
    assert load_public_key(key.public_bytes) == key.public_bytes
    with pytest.raises(ConfigError, match="32 raw Ed25519 bytes, got 3"):
        AuditKey.from_private_bytes(b"abc")
    with pytest.raises(ConfigError, match="must be PEM, 32 raw bytes or 64 hex"):
        load_public_key(b"nope")
