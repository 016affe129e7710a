"""``sealserve audit verify`` and ``sealserve audit report``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sealserve.cli.main import main
from sealserve.defense.audit.log import AuditKey, AuditLog, log_files, sha256_hex
from tests.conftest import ROOT, sealserve_cmd, sealserve_env


def demo_log(directory: Path, key: AuditKey) -> list[Path]:
    log = AuditLog.open(
        directory, key, checkpoint_every=50, checkpoint_interval_s=1e9, fsync=False, now=0.0
    )
    for i in range(120):
        attacker = i % 4 == 0
        account = "attacker" if attacker else f"honest-{i % 3}"
        score = min(1.0, i / 100) if attacker else 0.05
        log.append_query_at_time(
            float(i * 30),
            account=account,
            model="digits",
            input_sha256=sha256_hex(b"%d" % i),
            output_sha256=sha256_hex(b"o%d" % i),
            decision="throttle" if attacker and score >= 0.5 else "ok",
            flags={
                "prada": 0.1,
                "distribution": score,
                "distribution.coverage_ratio": 1.4 if attacker else 0.9,
                "distribution.outlier_rate": 0.9 if attacker else 0.02,
            },
        )
    log.append_status_change_at_time(
        3000.0,
        account="attacker",
        model="digits",
        previous="ok",
        status="throttle",
        expires_at=6600.0,
        reason="escalated to throttle: score 0.52 >= 0.5",
    )
    log.close_at_time(4000.0)
    return log_files(directory)


def test_verify_ok_and_tampered_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = AuditKey.generate()
    files = demo_log(tmp_path / "log", key)
    pem = tmp_path / "audit.pub"
    pem.write_bytes(key.public_key_pem())
    assert main(["audit", "verify", str(tmp_path / "log"), "--public-key", str(pem)]) == 0
    assert "audit log OK: 125 records" in capsys.readouterr().out
    assert main(["audit", "verify", str(files[0]), "--public-key", key.public_bytes.hex()]) == 0
    capsys.readouterr()
    body = files[0].read_bytes().splitlines(keepends=True)
    rec = json.loads(body[7])
    rec["decision"] = "ok!"
    body[7] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    files[0].write_bytes(b"".join(body))
    assert main(["audit", "verify", str(files[0]), "--public-key", str(pem)]) == 1
    out = capsys.readouterr().out
    assert "first bad record:" in out and "audit-000001.jsonl:8: record 7: record was edited" in out


def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = AuditKey.generate()
    demo_log(tmp_path, key)
    assert main(["audit", "verify", str(tmp_path), "--public-key", "zz"]) == 1
    assert "neither a readable file nor 64 hex" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "nope"), "--public-key", "a" * 64]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_report_table_html_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = AuditKey.generate()
    demo_log(tmp_path / "log", key)
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    code = main(["audit", "report", str(tmp_path / "log"), "--html", str(html), "--png", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    by_volume = out.split("Accounts by detector score:")[0]
    by_score = out.split("Accounts by detector score:")[1]
    assert "Accounts by volume (4 total)" in by_volume
    assert by_score.splitlines()[3].startswith("attacker")
    assert "1.40x" in by_score and "throttle" in by_score
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text()
    assert "data:image/png;base64," in page and "<b>attacker</b>: 1.00" in page


def test_cli_subprocess_exit_code(tmp_path: Path) -> None:
    key = AuditKey.generate()
    files = demo_log(tmp_path, key)
    files[0].write_bytes(files[0].read_bytes() + b'{"v":2}\n')
    out = subprocess.run(
        sealserve_cmd("audit", "verify", str(tmp_path), "--public-key", key.public_bytes.hex()),
        capture_output=True,
        text=True,
        env=sealserve_env(),
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 1
    assert "record lacks an integer seq" in out.stdout


def test_verify_expect_head_detects_a_cut_and_names_a_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sealserve.defense.audit.head import sign_head

    key = AuditKey.generate()
    log = AuditLog.open(tmp_path / "log", key, checkpoint_every=50, fsync=False, now=0.0)
    for i in range(120):
        log.append_key_release_at_time(float(i), model="m", key_id="k", outcome="released")
    head_file = tmp_path / "head.json"
    head_file.write_bytes(sign_head(log, now=200.0).to_json())
    seq, digest = log.head()
    log.close_at_time(201.0)
    pub = key.public_bytes.hex()
    base = ["audit", "verify", str(tmp_path / "log"), "--public-key", pub]
    assert main([*base, "--expect-head", str(head_file)]) == 0
    assert f"expected head {seq} found: the log was not cut short" in capsys.readouterr().out
    assert main([*base, "--expect-head", f"{seq}:{digest}"]) == 0
    capsys.readouterr()
    # A head from another log (same seq, other hash) is refused, with the record named.
    assert main([*base, "--expect-head", f"{seq}:{'0' * 64}"]) == 1
    out = capsys.readouterr().out
    assert f"record {seq}: record differs from the expected head (0000000000000000...)" in out
    # A head beyond the log's end: cut off.
    assert main([*base, "--expect-head", f"{seq + 40}:{digest}"]) == 1
    out = capsys.readouterr().out
    # (The log's last record is the closing checkpoint, one after the head.)
    assert f"the expected head is seq {seq + 40}: 39 record(s) were cut off" in out
    # A head signed by someone else's key is refused before the log is read.
    other = AuditKey.generate()
    forged = AuditLog.open(tmp_path / "other", other, fsync=False, now=0.0)
    head_file.write_bytes(sign_head(forged, now=1.0).to_json())
    assert main([*base, "--expect-head", str(head_file)]) == 1
    assert "--expect-head refused: the audit head is signed by an untrusted key" in (
        capsys.readouterr().out
    )
    # Bad input: a clear message, client text quoted short.
    assert main([*base, "--expect-head", "12:" + "z" * 500]) == 1
    err = capsys.readouterr().err
    assert "is neither SEQ:HASH" in err and "(503 chars)" in err and "z" * 40 not in err


def test_verify_unsigned_tail_hints_at_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = AuditKey.generate()
    log = AuditLog.open(tmp_path, key, checkpoint_every=50, fsync=False, now=0.0)
    log.append_key_release_at_time(1.0, model="m", key_id="k", outcome="released")
    assert main(["audit", "verify", str(tmp_path), "--public-key", key.public_bytes.hex()]) == 1
    assert "pass --allow-unsigned-tail" in capsys.readouterr().out
