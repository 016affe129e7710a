"""A tired operator's mistakes: each bad config or environment gives one ``error:`` line
naming the file, the key and the fix, exit code 2, and no traceback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sealserve import demo
from sealserve.cli.main import main
from tests.conftest import sealserve_cmd, sealserve_env

BASE = 'harden_process = false\nattestation_platform = "none"\nlog_format = "text"\nport = 0\n'
NOAUTH = "unsafe_disable_auth = true\nunsafe_plaintext = true\n"


def _repo(tmp: Path) -> None:
    shutil.copytree(demo.repository(), tmp / "models")


def _port_in_use(tmp: Path) -> str:
    _repo(tmp)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _HELD.append(sock)
    port = sock.getsockname()[1]
    return BASE.replace("port = 0", f"port = {port}") + NOAUTH + 'model_repository = "models"\n'


_HELD: list[socket.socket] = []


def _auth_table(tmp: Path, extra: str = "", jwks: str = "jwks.json") -> str:
    from sealserve.auth import generate_keypair

    _, keys = generate_keypair("ES256")
    (tmp / "jwks.json").write_text(json.dumps(keys))
    return (
        'unsafe_plaintext = true\n[auth]\naudience = "a"\nrequired_tos_version = "1"\n'
        + extra
        + f'[[auth.issuers]]\nissuer = "https://i.invalid"\njwks_file = "{jwks}"\n'
    )


def _unknown_auth_key(tmp: Path) -> str:
    _repo(tmp)
    return BASE + 'model_repository = "models"\n' + _auth_table(tmp, extra="audiense = 1\n")


def _missing_repository(tmp: Path) -> str:
    return BASE + NOAUTH + 'model_repository = "no-such-dir"\n'


def _unreadable_jwks(tmp: Path) -> str:
    _repo(tmp)
    return BASE + 'model_repository = "models"\n' + _auth_table(tmp, jwks="missing.json")


def _bad_state_store(tmp: Path) -> str:
    _repo(tmp)
    return (
        BASE + NOAUTH + 'model_repository = "models"\n'
        'state_store = "sqlite://no-such-dir/state.db"\n[limits.tiers.t]\nper_day = 10\n'
    )


def _unknown_store_scheme(tmp: Path) -> str:
    _repo(tmp)
    return (
        BASE + NOAUTH + 'model_repository = "models"\n'
        'state_store = "postgres://x"\n[limits.tiers.t]\nper_day = 10\n'
    )


def _defense_error(tmp: Path) -> str:
    _repo(tmp)
    return (
        BASE + NOAUTH + 'model_repository = "models"\n'
        '[defense.models.digits]\nprofile = "no-such-profile"\n'
    )


def _bad_sealed_model(tmp: Path) -> str:
    (tmp / "models" / "m" / "1").mkdir(parents=True)
    (tmp / "models" / "m" / "1" / "model.sealed").write_bytes(b"SEALMDL\x01" + b"\x00" * 64)
    return BASE + NOAUTH + 'model_repository = "models"\n'


def _plaintext_public(tmp: Path) -> str:
    _repo(tmp)
    return BASE + NOAUTH + 'model_repository = "models"\nhost = "0.0.0.0"\n'


def _workers_memory_store(tmp: Path) -> str:
    _repo(tmp)
    return BASE + NOAUTH + 'model_repository = "models"\nworkers = 2\nstate_store = "memory:"\n'


def _workers_bad_value(tmp: Path) -> str:
    _repo(tmp)
    return BASE + NOAUTH + 'model_repository = "models"\nworkers = 0\n'


def _workers_port_in_use(tmp: Path) -> str:
    return _port_in_use(tmp) + 'workers = 2\nstate_store = "sqlite://state.db"\n'


def _workers_bad_state_store(tmp: Path) -> str:
    return "workers = 2\n" + _bad_state_store(tmp)


CASES: list[tuple[str, Callable[[Path], str], str]] = [
    ("port in use", _port_in_use, "port: cannot listen on 127.0.0.1:"),
    ("unknown key in [auth]", _unknown_auth_key, "auth.audiense: unknown key"),
    ("missing model repository", _missing_repository, "model_repository: model repository"),
    ("unreadable JWKS", _unreadable_jwks, "missing.json"),
    ("bad state store", _bad_state_store, "state_store: state store unreachable"),
    ("unknown store scheme", _unknown_store_scheme, "state_store: state store url"),
    ("[defense] error", _defense_error, "[defense]: invalid settings: models.digits.output"),
    ("sealed model fails to open", _bad_sealed_model, "model.sealed"),
    ("plaintext on a public address", _plaintext_public, "set unsafe_plaintext_public = true"),
    ("workers on a memory store", _workers_memory_store, "workers > 1 needs a state store"),
    ("workers = 0", _workers_bad_value, "workers must be an integer from 1 to 256"),
    ("workers: port in use", _workers_port_in_use, "port: cannot listen on 127.0.0.1:"),
    ("workers: bad state store", _workers_bad_state_store, "state_store: state store unreach"),
]


@pytest.mark.parametrize(("case", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, case: str, make: Callable[[Path], str], message: str
) -> None:
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(make(tmp_path))
    try:
        out = subprocess.run(
            sealserve_cmd("serve", "--config", str(cfg)),
            env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        while _HELD:
            _HELD.pop().close()
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert len(errors) == 1, out.stderr[-2000:]
    line = errors[0]
    assert str(cfg) in line, line  # the file
    assert message in line, line  # the key and what is wrong
    assert "(fix: " in line, line  # the fix


def test_unreadable_config_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(BASE + NOAUTH)
    real = Path.read_text

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == cfg:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    # (Tests run as root, for whom chmod 000 does not make a file unreadable.)
    monkeypatch.setattr(Path, "read_text", unreadable)
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {cfg}: cannot read the config file: Permission denied")
    assert "(fix: Make the file readable" in err[0]
