"""JWKS parsing rules, RFC 7638 thumbprints and the file-backed key source."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sealserve.auth import Authenticator, FileJwksSource, jwk_thumbprint, parse_jwks
from sealserve.errors import AuthenticationError, ConfigError
from tests.auth.conftest import ISS, NOW, FakeClock, good_token, make_issuer, make_settings

RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
    "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
    "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_rfc7638_thumbprint_vector() -> None:
    # RFC 7638 section 3.1.
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc7638_key_gets_the_rsa_algorithms_its_alg_allows() -> None:
    keys = parse_jwks({"keys": [RFC7638_JWK]}, origin="test")
    assert keys["2011-04-29"].algorithms == {"RS256"}
    del RFC7638_JWK["alg"]
    try:
        keys = parse_jwks({"keys": [RFC7638_JWK]}, origin="test")
        assert keys["2011-04-29"].algorithms == {
            "RS256",
            "RS384",
            "RS512",
            "PS256",
            "PS384",
            "PS512",
        }
    finally:
        RFC7638_JWK["alg"] = "RS256"


def test_key_type_to_algorithm_binding() -> None:
    for alg in ("ES256", "ES384", "EdDSA"):
        jwk = make_issuer(alg).jwks()["keys"][0]
        del jwk["alg"]
        (key,) = parse_jwks({"keys": [jwk]}, origin="t").values()
        assert key.algorithms == {alg}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda k: k.pop("kid"), "no 'kid'"),
        (lambda k: k.update(use="enc"), "'use' is not 'sig'"),
        (lambda k: k.update(key_ops=["encrypt"]), "'key_ops' does not allow 'verify'"),
        (lambda k: k.update(alg="RS256"), "Not an RSA key"),
        (lambda k: k.update(alg="ES384"), "no acceptable algorithm"),
        (lambda k: k.update(alg="HS256"), "no acceptable algorithm"),
        (lambda k: k.update(d="AAAA"), "private key"),
        (lambda k: k.update(x="!!"), "kid"),
    ],
)
def test_unusable_keys_are_skipped(
    mutate: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_issuer().jwks()["keys"][0]
    bad = make_issuer().jwks()["keys"][0]
    mutate(bad)
    keys = parse_jwks({"keys": [bad, good]}, origin="t")
    assert list(keys) == [good["kid"]]
    assert reason in caplog.text


def test_symmetric_keys_are_never_used(caplog: pytest.LogCaptureFixture) -> None:
    oct_key = {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"}
    assert parse_jwks({"keys": [oct_key]}, origin="t") == {}
    assert "not an asymmetric signing key" in caplog.text


def test_not_a_jwks() -> None:
    with pytest.raises(ConfigError, match="not a JWKS"):
        parse_jwks({"kty": "EC"}, origin="t")


def write_jwks(path: Path, jwks: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jwks))
    tmp.replace(path)


def test_file_source_reloads_on_change(tmp_path: Path) -> None:
    old, new = make_issuer(), make_issuer()
    path = tmp_path / "jwks.json"
    write_jwks(path, old.jwks())
    clock = FakeClock()
    source = FileJwksSource(path, check_interval=1.0, clock=clock)
    source.start()
    auth = Authenticator(make_settings(), sources={ISS: source})
    assert auth.authenticate_at_time(f"Bearer {good_token(old)}", required_scope="infer", now=NOW)
    write_jwks(path, new.jwks())
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse-grained filesystems
    clock.advance(1.5)
    assert auth.authenticate_at_time(f"Bearer {good_token(new)}", required_scope="infer", now=NOW)
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(f"Bearer {good_token(old)}", required_scope="infer", now=NOW)
    assert "is not in the JWKS" in info.value.log_detail


def test_file_source_keeps_keys_when_the_file_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = make_issuer()
    path = tmp_path / "jwks.json"
    write_jwks(path, issuer.jwks())
    clock = FakeClock()
    source = FileJwksSource(path, clock=clock)
    source.start()
    path.write_text("{not json")
    clock.advance(2)
    assert source.get(issuer.kid) is not None
    assert "reload failed, keeping 1 cached keys" in caplog.text


def test_file_source_without_usable_keys_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="holds no usable key"):
        FileJwksSource(path).start()
    with pytest.raises(ConfigError, match="holds no usable key"):
        FileJwksSource(tmp_path / "missing.json").start()
