"""The broker's TLS identity: a lasting one from the operator's files (the key not
readable by every user), made by `sealserve broker init-tls`; the in-memory default
warns that restarts break the servers' pins."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sealserve.broker.tls import CERT_NAME, KEY_NAME, load_identity
from sealserve.cli.main import main
from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import ConfigError
from tests.broker.conftest import Running

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]


def _init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    out = tmp_path / "tls"
    assert main(["broker", "init-tls", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'servers:                [key_broker] ca_file = "{out / CERT_NAME}"' in printed
    return out / CERT_NAME, out / KEY_NAME


def test_init_tls_writes_a_private_key_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = _init(tmp_path, capsys)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ident = load_identity(cert, key)
    assert not ident.ephemeral
    before = key.read_bytes()
    assert main(["broker", "init-tls", "--out", str(cert.parent)]) == 1
    assert f"cannot create {key}: File exists" in capsys.readouterr().err
    assert key.read_bytes() == before


def test_a_broker_restarted_with_its_files_keeps_its_certificate(
    start_broker: Callable[..., Running],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = _init(tmp_path, capsys)
    first = start_broker(tls_cert_file=cert, tls_key_file=key)
    second = start_broker(tls_cert_file=cert, tls_key_file=key)
    assert first.ca_pem == second.ca_pem == cert.read_bytes()
    with second.admin() as admin:  # the pinned certificate is the one served
        assert admin.list_keys() == []
    assert "made in memory" not in caplog.text


def test_the_in_memory_identity_warns_that_restarts_break_waiting_servers(
    start_broker: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sealserve.broker")
    first, second = start_broker(), start_broker()
    assert first.ca_pem != second.ca_pem
    warnings = [r.getMessage() for r in caplog.records if "made in memory" in r.getMessage()]
    assert len(warnings) == 2
    assert "changes at every restart" in warnings[0]
    assert "tls_cert_file and tls_key_file" in warnings[0] and "init-tls" in warnings[0]


def test_a_key_readable_by_every_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = _init(tmp_path, capsys)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as info:
        load_identity(cert, key)
    assert info.value.message == f"tls_key_file {key} is readable by every user (mode 0644)"
    assert info.value.remedy.startswith(f"chmod 600 {key}")
    os.chmod(key, 0o640)  # a service group may read it
    load_identity(cert, key)


def test_a_certificate_of_another_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = _init(tmp_path, capsys)
    cert.write_bytes(TlsIdentity.generate().cert_pem)
    with pytest.raises(ConfigError, match="is not the certificate of"):
        load_identity(cert, key)
    with pytest.raises(ConfigError, match="tls_key_file .*missing.pem: cannot read"):
        load_identity(cert, tmp_path / "missing.pem")
