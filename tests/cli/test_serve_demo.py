"""The CLI as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import sealserve_cmd, sealserve_env


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    out = subprocess.run(
        sealserve_cmd("demo", "--requests", "100", "--workdir", str(work)),
        env=sealserve_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "released by the broker after attestation" in text
    assert "attested before sending anything" in text
    assert "request without a token refused" in text
    acc = float(text.split("accuracy ")[1].split(";")[0])
    agree = float(text.split("unperturbed model ")[1].split(";")[0])
    # The demo marks 1% of answers (a fresh key each run): on 100 requests, 6 or more
    # marks (agreement < 0.95) has probability 5e-4; 3 or more has 8%, so 0.98 flaked.
    assert acc > 0.9 and agree >= 0.95
    assert "malformed request refused" in text
    assert "over REST on 127.0.0.1:" in text and "same TLS key as gRPC: True" in text, text
    assert "[mallory] uniform-noise extraction refused after" in text
    assert "still served during the attack" in text
    assert "watermark on trudy's replica" in text and "-> PROVEN" in text, text
    assert "independently trained model" in text and "no claim" in text
    assert "audit log verifies: audit log OK" in text
    assert f"files kept in {work}" in text
    # The owner's report from this demo run's audit log.
    report = subprocess.run(
        sealserve_cmd("audit", "report", str(work / "audit"), "--html", str(work / "r.html")),
        env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "mallory" in report.stdout and "suspend" in report.stdout
    assert "<img" in (work / "r.html").read_text()
    verify = subprocess.run(
        sealserve_cmd("audit", "verify", str(work / "audit"),
                      "--public-key", str(work / "state" / "audit-public.pem")),
        env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and "audit log OK" in verify.stdout


def test_serve_with_bad_config_exits_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("port = 99999999\nunsafe_disable_auth = true\n")
    out = subprocess.run(
        sealserve_cmd("serve", "--config", str(cfg)),
        env=sealserve_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2  # a config error is a usage error
    assert (
        "error:" in out.stderr and "port: Input should be less than or equal to 65535" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_help_lists_commands() -> None:
    out = subprocess.run(
        sealserve_cmd("--help"), env=sealserve_env(), capture_output=True, text=True, check=True
    )
    assert "serve" in out.stdout and "demo" in out.stdout


def test_every_subcommand_has_help() -> None:
    import contextlib
    import io

    import pytest

    from sealserve.cli.main import build_parser, subcommands

    for module in subcommands():
        name = module.replace("_", "-")
        out = io.StringIO()
        with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(out):
            build_parser().parse_args([name, "--help"])
        assert info.value.code == 0, name
        assert name in out.getvalue()
