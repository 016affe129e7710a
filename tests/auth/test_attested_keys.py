"""Token keys in the attestation: the keys held at start are pinned (and measured); a key
added to the JWKS file afterwards cannot mint an `admin` token, and a jwks_url issuer
is never trusted for `admin`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealserve.auth import Authenticator, AuthSettings, IssuerSettings
from sealserve.auth.keys import (
    FileJwksSource,
    UrlJwksSource,
    attested_key_record_for,
    parse_jwks,
)
from sealserve.errors import PermissionDeniedError
from tests.auth.conftest import AUD, ISS, NOW, TOS, good_token, make_issuer

URL_ISS = "https://url-issuer.test"


def _write(path: Path, *jwks: dict[str, list[object]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [k for doc in jwks for k in doc["keys"]]}))
    os.replace(tmp, path)


def test_a_key_added_after_start_cannot_mint_an_admin_token(tmp_path: Path) -> None:
    owner, intruder = make_issuer(), make_issuer()
    jwks = tmp_path / "jwks.json"
    _write(jwks, owner.jwks())
    settings = AuthSettings(issuers=(IssuerSettings(ISS, jwks_file=jwks),), audience=AUD,
                            required_tos_version=TOS, cache_max_entries=0)  # fmt: skip
    source = FileJwksSource(jwks, check_interval=0.0)
    auth = Authenticator(settings, sources={ISS: source})
    auth.start()
    pinned = auth.attested_keys()
    assert pinned == {ISS: {"source": "file", "admin": True,
                            "thumbprints": sorted(source.thumbprints())}}  # fmt: skip
    # What `sealserve measure` computes from the same file: the same record.
    assert attested_key_record_for(settings.issuers) == pinned

    def admin(issuer: object) -> str:
        token = good_token(issuer, scopes=["admin", "infer"])  # type: ignore[arg-type]
        return f"Bearer {token}"

    assert auth.authenticate_at_time(admin(owner), required_scope="admin", now=NOW).account
    # The operator (who can write the JWKS Secret) adds a key and mints an admin token.
    _write(jwks, owner.jwks(), intruder.jwks())
    token = admin(intruder)
    with pytest.raises(PermissionDeniedError, match="not among the attested token keys"):
        auth.authenticate_at_time(token, required_scope="admin", now=NOW)
    # The same token still verifies for other scopes (the file is the issuer's key set).
    assert auth.authenticate_at_time(token, required_scope="infer", now=NOW).account == "alice"
    # The owner's admin tokens still work, and the attested record did not move.
    assert auth.authenticate_at_time(admin(owner), required_scope="admin", now=NOW).account
    assert auth.attested_keys() == pinned


def test_a_jwks_url_issuer_is_trusted_for_infer_but_never_admin() -> None:
    remote = make_issuer(issuer=URL_ISS)
    settings = AuthSettings(issuers=(IssuerSettings(URL_ISS, jwks_url="https://keys.invalid/j"),),
                            audience=AUD, required_tos_version=TOS)  # fmt: skip
    source = UrlJwksSource("https://keys.invalid/j")
    source._keys = parse_jwks(remote.jwks(), origin="test")  # as fetched, without a network
    auth = Authenticator(settings, sources={URL_ISS: source})
    auth._admin_keys = {}  # start() would fetch; pin as it would (URL issuers: nothing)
    assert auth.attested_keys() == {URL_ISS: {"source": "url", "admin": False}}
    infer = good_token(remote, scopes=["infer", "admin"])
    assert auth.authenticate_at_time(f"Bearer {infer}", required_scope="infer", now=NOW)
    with pytest.raises(PermissionDeniedError, match="not among the attested token keys"):
        auth.authenticate_at_time(f"Bearer {infer}", required_scope="admin", now=NOW)
