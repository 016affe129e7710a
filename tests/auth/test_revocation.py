"""Revocation lists: in-memory and file-backed (reloaded on change, failing closed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealserve.auth import (
    Authenticator,
    AuthSettings,
    FileRevocationList,
    InMemoryRevocationList,
    IssuerSettings,
    dump_revocations,
)
from sealserve.errors import ConfigError, UnavailableError
from tests.auth.conftest import AUD, ISS, NOW, TOS, FakeClock, good_token, make_issuer


def test_in_memory() -> None:
    rl = InMemoryRevocationList(revoked_token_ids=["a"])
    assert rl.is_revoked("a") and not rl.is_revoked("b")
    rl.suspend("eve")
    assert rl.is_suspended("eve")
    rl.reinstate("eve")
    assert not rl.is_suspended("eve")


def test_file_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    dump_revocations(path, revoked_token_ids=["j1"])
    clock = FakeClock()
    rl = FileRevocationList(path, check_interval=1.0, clock=clock)
    assert rl.is_revoked("j1") and not rl.is_suspended("eve")
    dump_revocations(path, revoked_token_ids=["j1", "j2"], suspended_accounts=["eve"])
    os.utime(path, ns=(5, 5))
    assert not rl.is_revoked("j2")  # not yet re-checked: at most one stat per interval
    clock.advance(1.1)
    assert rl.is_revoked("j2") and rl.is_suspended("eve")


def test_file_fails_closed_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    dump_revocations(path, revoked_token_ids=["j1"])
    clock = FakeClock()
    rl = FileRevocationList(path, clock=clock)
    path.write_text("{broken")
    clock.advance(2)
    with pytest.raises(UnavailableError, match="revocation list is unavailable"):
        rl.is_revoked("other")
    dump_revocations(path, revoked_token_ids=[])
    clock.advance(2)
    assert not rl.is_revoked("j1")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"revoked_token_ids": []}', "not a sealserve revocation file"),
        ('{"format": "sealserve-revocations", "version": 2}', "unsupported version"),
        ('{"format": "sealserve-revocations", "version": 1, "revoked_token_ids": [1]}', "list"),
        ("[]", "not a sealserve revocation file"),
    ],
)
def test_file_invalid_at_start_is_a_config_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "revoked.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        FileRevocationList(path)


def test_settings_wire_the_revocation_file(tmp_path: Path) -> None:
    issuer = make_issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    revoked = tmp_path / "revoked.json"
    dump_revocations(revoked, suspended_accounts=["alice"])
    settings = AuthSettings(
        issuers=(IssuerSettings(ISS, jwks_file=jwks),),
        audience=AUD,
        required_tos_version=TOS,
        revocation_file=revoked,
    )
    with Authenticator.from_settings(settings) as auth:
        assert auth.revocation.is_suspended("alice")
        ok = auth.authenticate_at_time(
            f"Bearer {good_token(issuer, sub='bob')}", required_scope="infer", now=NOW
        )
        assert ok.account == "bob"
