"""``sealserve token``: keygen -> issue -> authenticate, and inspect."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from sealserve.auth import Authenticator, AuthSettings, IssuerSettings
from sealserve.cli.main import main

ISS = "https://issuer.cli.test"
AUD = "sealserve-cli"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_keygen_issue_authenticate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str
) -> None:
    code, out, _ = run(capsys, "token", "keygen", "--out-dir", str(tmp_path), "--alg", alg)
    assert code == 0 and "kid:" in out
    key = tmp_path / "signing-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    jwks = json.loads((tmp_path / "jwks.json").read_text())
    assert jwks["keys"][0]["alg"] == alg and "d" not in jwks["keys"][0]

    code, out, _ = run(
        capsys, "token", "issue", "--key", str(key), "--issuer", ISS, "--audience", AUD,
        "--sub", "acct-7", "--tier", "pro", "--scope", "infer", "--scope", "metadata",
        "--tos", "2026-01", "--ttl", "15m",
    )  # fmt: skip
    assert code == 0
    token = out.strip()

    settings = AuthSettings(
        issuers=(IssuerSettings(ISS, jwks_file=tmp_path / "jwks.json"),),
        audience=AUD,
        required_tos_version="2026-01",
    )
    with Authenticator.from_settings(settings) as auth:
        principal = auth.authenticate(f"Bearer {token}", required_scope="metadata")
    assert principal.account == "acct-7"
    assert principal.tier == "pro"
    assert principal.scopes == {"infer", "metadata"}
    assert principal.tos_version == "2026-01"
    assert 14 * 60 < principal.expires_at - time.time() <= 15 * 60  # --ttl 15m


def test_keygen_refuses_to_overwrite_and_rotates_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "token", "keygen", "--out-dir", str(tmp_path))[0] == 0
    code, _, err = run(capsys, "token", "keygen", "--out-dir", str(tmp_path))
    assert code == 1
    assert "exists; refusing to overwrite a key" in err
    code, _, _ = run(capsys, "token", "keygen", "--out-dir", str(tmp_path), "--key-name", "k2")
    assert code == 0
    assert len(json.loads((tmp_path / "jwks.json").read_text())["keys"]) == 2


def test_inspect_prints_unverified_claims(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "token", "keygen", "--out-dir", str(tmp_path))
    _, out, _ = run(
        capsys, "token", "issue", "--key", str(tmp_path / "signing-key.pem"), "--issuer", ISS,
        "--audience", AUD, "--sub", "bob", "--tier", "free", "--scope", "infer",
        "--tos", "v1", "--ttl", "1h",
    )  # fmt: skip
    code, out, err = run(capsys, "token", "inspect", out.strip())
    assert code == 0
    assert "UNVERIFIED" in err
    document = json.loads(out)
    assert "not checked" in document["UNVERIFIED"]
    assert document["header"]["alg"] == "ES256"
    assert document["claims"]["sub"] == "bob"
    assert document["claims"]["sealserve_tos"] == "v1"
    assert document["claims"]["exp"] - document["claims"]["iat"] == 3600


def test_inspect_garbage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "token", "inspect", "not-a-token")
    assert code == 1
    assert "error: not a JWT" in err


def test_issue_bad_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "token", "keygen", "--out-dir", str(tmp_path))
    code, _, err = run(
        capsys, "token", "issue", "--key", str(tmp_path / "signing-key.pem"), "--issuer", ISS,
        "--audience", AUD, "--sub", "bob", "--tier", "free", "--scope", "infer",
        "--tos", "v1", "--ttl", "forever",
    )  # fmt: skip
    assert code == 1
    assert "not a duration: 'forever'" in err
    assert "90s, 15m, 1h or 7d" in err
