"""``sealserve health`` against real servers (TLS in memory, TLS from files, plaintext)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sealserve.cli.main import main
from sealserve.enclave.tls import TlsIdentity
from tests.conftest import sealserve_cmd, sealserve_env


def _health(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["health", "--timeout", "5", *args])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one line, whatever the outcome
    return code, out.strip()


def test_serving_over_in_memory_tls(
    start_server: Any, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_server(model_repository=repo)
    assert running.server.tls is not None and running.server.tls.ephemeral
    code, line = _health(capsys, "--target", running.target)
    assert (code, line) == (0, f"SERVING {running.target}")
    code, line = _health(
        capsys, "--target", running.target, "--service", "inference.GRPCInferenceService"
    )
    assert code == 0 and line.startswith("SERVING")


def test_not_serving_after_graceful_shutdown_starts(
    start_server: Any, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_server(model_repository=repo)
    fut = asyncio.run_coroutine_threadsafe(
        running.server.health.enter_graceful_shutdown(), running.loop
    )
    fut.result(10)
    code, line = _health(capsys, "--target", running.target)
    assert (code, line) == (1, f"UNHEALTHY {running.target}: NOT_SERVING")


def test_unknown_service(start_server: Any, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    running = start_server(model_repository=repo)
    code, line = _health(capsys, "--target", running.target, "--service", "no.such.Service")
    assert code == 1
    assert line.startswith(f"UNHEALTHY {running.target} service 'no.such.Service': NOT_FOUND")


def test_plaintext(start_server: Any, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    running = start_server(model_repository=repo, unsafe_plaintext=True)
    code, line = _health(capsys, "--target", running.target, "--plaintext")
    assert (code, line) == (0, f"SERVING {running.target}")
    # Speaking TLS to a plaintext server fails cleanly, in one line.
    code, line = _health(capsys, "--target", running.target)
    assert code == 1 and "cannot fetch the TLS certificate" in line


def test_ca_file(
    start_server: Any, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ident = TlsIdentity.generate()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(ident.cert_pem)
    key.write_bytes(ident.key_pem)
    running = start_server(model_repository=repo, tls_cert_file=cert, tls_key_file=key)
    code, line = _health(capsys, "--target", running.target, "--ca-file", str(cert))
    assert (code, line) == (0, f"SERVING {running.target}")
    other = tmp_path / "other.pem"
    other.write_bytes(TlsIdentity.generate().cert_pem)
    code, line = _health(capsys, "--target", running.target, "--ca-file", str(other))
    assert code == 1 and line.startswith(f"UNHEALTHY {running.target}: UNAVAILABLE")
    code, line = _health(capsys, "--target", running.target, "--ca-file", str(tmp_path / "nope"))
    assert code == 1 and "cannot read" in line and "nope" in line


def test_nothing_listening_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Through the real command: the exit status is what a container runtime sees.
    out = subprocess.run(
        sealserve_cmd("health", "--target", f"127.0.0.1:{port}", "--timeout", "3"),
        env=sealserve_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stdout.startswith(f"UNHEALTHY 127.0.0.1:{port}: cannot fetch the TLS certificate")
    assert "Traceback" not in out.stderr
