"""An audit log whose length is evident: cut, dropped and rewritten logs are detected.

Who detects what (docs/detection-audit.md): the public key alone catches gaps, edits
and a missing first file; a head the auditor saw catches any cut or rewrite below it;
the server's MAC key catches a rewritten unsigned tail when it restarts.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from sealserve.canonical import canonical_json
from sealserve.defense.audit.head import AuditHead, head_public_key, sign_head
from sealserve.defense.audit.log import (
    AuditKey,
    AuditLog,
    encode_record,
    log_files,
    sha256_hex,
    split_mac,
)
from sealserve.defense.audit.verify import AuditReport, verify_audit_log
from sealserve.errors import AuditError, ConfigError


@pytest.fixture
def key() -> AuditKey:
    return AuditKey.generate()


def _query(log: AuditLog, t: float, account: str = "a") -> None:
    log.append_query_at_time(
        t, account=account, model="m", input_sha256="a" * 64, output_sha256="b" * 64,
        decision="ok", flags={},
    )  # fmt: skip


def _open(path: Path, key: AuditKey, now: float = 0.0) -> AuditLog:
    return AuditLog.open(path, key, checkpoint_every=5, fsync=False, now=now)


def _verify(path: Path, key: AuditKey, **options: Any) -> AuditReport:
    return verify_audit_log(log_files(path), trusted_public_keys=[key.public_bytes], **options)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_truncation_right_after_a_checkpoint_is_caught_by_the_head(
    tmp_path: Path, key: AuditKey
) -> None:
    log = _open(tmp_path, key)
    for i in range(12):
        _query(log, 1.0 + i)
    head = sign_head(log, nonce=b"n" * 32, now=20.0)
    log.close_at_time(21.0)
    f = log_files(tmp_path)[0]
    body = _lines(f)
    cut = max(i for i, x in enumerate(body[:-2]) if json.loads(x)["kind"] == "checkpoint")
    f.write_bytes(b"".join(body[: cut + 1]))
    # The cut log ends at a signed checkpoint: the public key alone cannot tell.
    assert _verify(tmp_path, key).ok
    with pytest.raises(AuditError, match=r"the log ends at seq \d+ but the expected head is seq "
                       r"\d+: \d+ record\(s\) were cut off"):  # fmt: skip
        _verify(tmp_path, key, expect_head=head)


def test_deleted_first_and_last_rotated_files(tmp_path: Path, key: AuditKey) -> None:
    log = _open(tmp_path, key)
    for i in range(9):
        _query(log, 1.0 + i)
        if i in (2, 5):
            log.rotate_at_time(1.0 + i)
    head = AuditHead.parse(f"{log.head()[0]}:{log.head()[1]}")
    log.close_at_time(20.0)
    first, _middle, last = log_files(tmp_path)
    assert _verify(tmp_path, key, expect_head=head).ok
    os.rename(first, tmp_path / "kept-aside-1")
    with pytest.raises(AuditError, match=r"its first file\(s\) are missing"):
        _verify(tmp_path, key)
    os.rename(tmp_path / "kept-aside-1", first)
    last.unlink()
    assert _verify(tmp_path, key).ok  # ends signed: invisible
    with pytest.raises(AuditError, match="were cut off"):
        _verify(tmp_path, key, expect_head=head)
    # The server restarts on the shortened log and writes on: the head's seq exists
    # again, with another record in it.
    again = _open(tmp_path, key, now=30.0)
    for i in range(8):
        _query(again, 31.0 + i)
    again.close_at_time(40.0)
    with pytest.raises(AuditError, match="record differs from the expected head"):
        _verify(tmp_path, key, expect_head=head)


def _crash(tmp_path: Path, key: AuditKey, n: int = 8) -> tuple[AuditLog, AuditHead]:
    """A log whose server died with ``n - 4`` records after the last checkpoint (the
    open record and four queries were signed)."""
    log = _open(tmp_path, key)
    for i in range(n):
        _query(log, 1.0 + i, account=f"acct-{i}")
    return log, sign_head(log, now=10.0)  # no close: the process died here


def test_dropped_unsigned_tail_is_caught_by_the_head(tmp_path: Path, key: AuditKey) -> None:
    _, head = _crash(tmp_path, key)
    f = log_files(tmp_path)[0]
    body = _lines(f)
    last_cp = max(i for i, x in enumerate(body) if json.loads(x)["kind"] == "checkpoint")
    f.write_bytes(b"".join(body[: last_cp + 1]))
    assert _verify(tmp_path, key).ok
    with pytest.raises(AuditError, match="were cut off"):
        _verify(tmp_path, key, expect_head=head)


def _rewrite_tail(f: Path) -> int:
    """Rewrite the records after the last checkpoint (account names) and recompute the
    hash chain, as someone without the MAC key would (the old MACs stay). Returns the
    seq of the first rewritten record."""
    body = _lines(f)
    last_cp = max(i for i, x in enumerate(body) if json.loads(x)["kind"] == "checkpoint")
    out = body[: last_cp + 1]
    prev = sha256_hex(out[-1].rstrip(b"\n"))
    for raw in body[last_cp + 1 :]:
        rec = json.loads(raw)
        rec["account"] = "someone-else"
        rec["prev"] = prev
        line = canonical_json(rec)
        prev = sha256_hex(line)
        out.append(line + b"\n")
    f.write_bytes(b"".join(out))
    return int(json.loads(body[last_cp + 1])["seq"])


def test_rewritten_unsigned_tail_is_caught_at_restart_and_by_the_head(
    tmp_path: Path, key: AuditKey
) -> None:
    _, head = _crash(tmp_path, key)
    f = log_files(tmp_path)[0]
    first_bad = _rewrite_tail(f)
    # An auditor with the head, before any restart:
    with pytest.raises(AuditError, match="record differs from the expected head"):
        _verify(tmp_path, key, expect_head=head, allow_unsigned_tail=True)
    # The server restarts: its MAC check finds the rewrite and says so, signed.
    resumed = _open(tmp_path, key, now=50.0)
    assert resumed.recovery["mac_failures"] == 4 and resumed.recovery["first_bad_seq"] == first_bad
    resumed.close_at_time(51.0)
    with pytest.raises(
        AuditError,
        match=rf"on restart the server found 4 of 4 unsigned record\(s\) from seq {first_bad} "
        r"whose MAC did not verify: the log was rewritten while the server was stopped",
    ):
        _verify(tmp_path, key)


def test_forged_tail_with_a_new_mac_key_is_caught_at_restart(tmp_path: Path, key: AuditKey) -> None:
    _crash(tmp_path, key)
    f = log_files(tmp_path)[0]
    body = _lines(f)
    out, prev = [], None
    for raw in body:
        parts = split_mac(raw.rstrip(b"\n"))
        assert parts is not None
        rec = json.loads(parts[1])
        if prev is not None:
            rec["prev"] = prev
        if rec["kind"] == "query" and rec["account"] == "acct-7":
            rec["decision"] = "suspend"
        line = encode_record(rec, b"guessed-mac-key-000000000000000!")
        prev = sha256_hex(line)
        out.append(line + b"\n")
    f.write_bytes(b"".join(out))
    resumed = _open(tmp_path, key, now=50.0)
    assert resumed.recovery["mac_failures"] >= 1


def test_crash_recovery_signs_the_unsigned_records(tmp_path: Path, key: AuditKey) -> None:
    _, head = _crash(tmp_path, key)
    with pytest.raises(AuditError, match="not covered by any signature"):
        _verify(tmp_path, key)
    resumed = _open(tmp_path, key, now=50.0)
    assert resumed.recovery == {"recovered": 4, "recovered_from": 6}
    kinds = [json.loads(x)["kind"] for x in _lines(resumed.current_path)[-2:]]
    assert kinds == ["resume", "checkpoint"]  # signed at once
    report = _verify(tmp_path, key, expect_head=head)
    assert report.ok and report.unsigned_tail == 0
    assert any("4 unsigned record(s) from seq 6 were recovered after a crash" in w
               for w in report.warnings)  # fmt: skip


def test_torn_last_record_is_moved_aside_and_the_log_continues(
    tmp_path: Path, key: AuditKey
) -> None:
    _crash(tmp_path, key)
    f = log_files(tmp_path)[0]
    data = f.read_bytes()
    f.write_bytes(data[:-7])  # the last write was cut mid-record
    resumed = _open(tmp_path, key, now=50.0)
    assert resumed.recovery["torn_bytes"] == len(data.splitlines()[-1]) - 6
    aside = tmp_path / resumed.recovery["torn_file"]
    assert aside.name == "audit-000001.jsonl.torn-1"
    assert aside.read_bytes() == data.splitlines(keepends=True)[-1][:-7]
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    _query(resumed, 51.0)
    resumed.close_at_time(52.0)
    report = _verify(tmp_path, key)
    assert report.ok
    assert any("a torn last record" in w and "torn-1" in w
               for w in report.warnings)  # fmt: skip


def test_files_are_private(tmp_path: Path, key: AuditKey) -> None:
    old = os.umask(0o022)
    try:
        log = _open(tmp_path / "audit", key)
        log.rotate_at_time(1.0)
        log.close_at_time(2.0)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700
    for f in log_files(tmp_path / "audit"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_signed_head_verifies_and_refuses_tampering(tmp_path: Path, key: AuditKey) -> None:
    log = _open(tmp_path, key)
    _query(log, 1.0)
    head = sign_head(log, nonce=b"\x01" * 32, now=2.0)
    again = AuditHead.from_json(head.to_json())
    assert again == head and again.seq == 1
    trusted = {key.fingerprint: head_public_key(head)}
    again.verify(trusted, nonce=(b"\x01" * 32).hex())
    with pytest.raises(AuditError, match="does not answer this nonce"):
        again.verify(trusted, nonce="00")
    moved = AuditHead.from_json(head.to_json().replace(b'"seq":1', b'"seq":0'))
    with pytest.raises(AuditError, match="signature does not verify"):
        moved.verify(trusted)
    other = AuditKey.generate()
    with pytest.raises(AuditError, match="untrusted key"):
        again.verify({other.fingerprint: other.public_bytes})
    # A signed head that does not verify is refused before the log is read.
    with pytest.raises(AuditError, match="signature does not verify"):
        _verify(tmp_path, key, expect_head=moved, allow_unsigned_tail=True)


def test_expect_head_bad_input_is_named(key: AuditKey) -> None:
    with pytest.raises(ConfigError, match=r"--expect-head 'x{32}\.\.\.' \(5000 chars\) is neither"):
        AuditHead.parse("x" * 5000)
    with pytest.raises(ConfigError, match="is not a sealserve-audit-head/1 object"):
        AuditHead.parse('{"seq": 1}')
    with pytest.raises(ConfigError, match="a seq >= 0 and a 64-hex-digit hash"):
        AuditHead.from_json(json.dumps({"format": "sealserve-audit-head/1", "seq": 1,
                                        "hash": "zz"}))  # fmt: skip


def test_record_removed_from_the_unsigned_tail_is_caught_at_restart(
    tmp_path: Path, key: AuditKey
) -> None:
    _crash(tmp_path, key)
    f = log_files(tmp_path)[0]
    body = _lines(f)
    last_cp = max(i for i, x in enumerate(body) if json.loads(x)["kind"] == "checkpoint")
    removed = json.loads(body[last_cp + 1])["seq"]
    f.write_bytes(b"".join(body[: last_cp + 1] + body[last_cp + 2 :]))  # MACs all intact
    resumed = _open(tmp_path, key, now=50.0)
    assert resumed.recovery["mac_failures"] == 1
    assert resumed.recovery["first_bad_seq"] == removed + 1
