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
    files[0].write_bytes(files[0].read_bytes() + b'{"v":1}\n')
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
