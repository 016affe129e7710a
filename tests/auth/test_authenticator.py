"""Accepted tokens, the verified-token cache, settings validation."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from sealserve.auth import (
    INVALID_TOKEN_MESSAGE,
    Authenticator,
    AuthSettings,
    InMemoryRevocationList,
    IssuerSettings,
    Principal,
    StaticJwksSource,
    TokenIssuer,
)
from sealserve.auth.keys import JwksSource
from sealserve.errors import (
    AuthenticationError,
    ConfigError,
    SuspendedError,
)
from tests.auth.conftest import AUD, ISS, NOW, TOS, good_token, make_issuer, make_settings


class MutableSource(JwksSource):
    """A source whose JWKS the test swaps (stands in for a rotated issuer)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        super().__init__(name="mutable", min_refresh=0.0)
        self.jwks = jwks
        self.refresh_now()

    def _load(self) -> dict[str, Any]:
        return self.jwks


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("options", {}).get("verify_signature", True):
            calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_valid_token_yields_principal(auth: Authenticator, issuer: TokenIssuer) -> None:
    token = good_token(issuer, sub="acct-42", tier="pro", jti="tok-1", scopes=["infer", "metadata"])
    principal = auth.authenticate_at_time(f"Bearer {token}", required_scope="metadata", now=NOW)
    assert principal == Principal(
        account="acct-42",
        tier="pro",
        scopes=frozenset({"infer", "metadata"}),
        tos_version=TOS,
        token_id="tok-1",
        expires_at=NOW + 3600,
        issuer=ISS,
    )
    assert principal.has_scope("infer") and not principal.has_scope("admin")


def test_scheme_is_case_insensitive_and_whitespace_tolerated(
    auth: Authenticator, issuer: TokenIssuer
) -> None:
    token = good_token(issuer)
    for header in (f"bearer {token}", f"  BEARER   {token}  "):
        assert auth.authenticate_at_time(header, required_scope="infer", now=NOW).account


@pytest.mark.parametrize("alg", ["EdDSA", "ES384", "RS256", "PS256"])
def test_other_algorithms(alg: str) -> None:
    iss = make_issuer(alg)
    settings = make_settings(algorithms=("ES256", "ES384", "RS256", "PS256", "EdDSA"))
    auth = Authenticator(settings, sources={ISS: StaticJwksSource(iss.jwks())})
    principal = auth.authenticate_at_time(
        f"Bearer {good_token(iss)}", required_scope="infer", now=NOW
    )
    assert principal.account == "alice"


def test_algorithm_not_configured_is_refused() -> None:
    iss = make_issuer("ES384")
    auth = Authenticator(make_settings(), sources={ISS: StaticJwksSource(iss.jwks())})
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(f"Bearer {good_token(iss)}", required_scope="infer", now=NOW)
    assert info.value.message == INVALID_TOKEN_MESSAGE
    assert "'ES384' is not accepted" in info.value.log_detail


def test_key_of_another_trusted_issuer_is_refused() -> None:
    a = make_issuer(issuer="https://a.test")
    b = make_issuer(issuer="https://b.test")
    settings = make_settings("https://a.test", "https://b.test")
    auth = Authenticator(
        settings,
        sources={
            "https://a.test": StaticJwksSource(a.jwks()),
            "https://b.test": StaticJwksSource(b.jwks()),
        },
    )
    # Signed with a's key but claiming to come from b.
    forged = TokenIssuer(a._key, issuer="https://b.test", audience=AUD)
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(f"Bearer {good_token(forged)}", required_scope="infer", now=NOW)
    assert info.value.message == INVALID_TOKEN_MESSAGE
    assert "not in the JWKS of 'https://b.test'" in info.value.log_detail
    for iss in (a, b):
        assert auth.authenticate_at_time(
            f"Bearer {good_token(iss)}", required_scope="infer", now=NOW
        )


def test_cache_hit_skips_signature_verification(
    auth: Authenticator, issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_decodes(monkeypatch)
    header = f"Bearer {good_token(issuer)}"
    for _ in range(5):
        auth.authenticate_at_time(header, required_scope="infer", now=NOW)
    assert calls[0] == 1


def test_cache_rechecks_expiry(auth: Authenticator, issuer: TokenIssuer) -> None:
    header = f"Bearer {good_token(issuer, ttl=600)}"
    auth.authenticate_at_time(header, required_scope="infer", now=NOW)
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(header, required_scope="infer", now=NOW + 600 + 31)
    assert info.value.message == INVALID_TOKEN_MESSAGE
    assert "expired" in info.value.log_detail


def test_cache_rechecks_revocation_and_suspension(issuer: TokenIssuer) -> None:
    revocation = InMemoryRevocationList()
    auth = Authenticator(
        make_settings(), sources={ISS: StaticJwksSource(issuer.jwks())}, revocation=revocation
    )
    t1, t2 = good_token(issuer, jti="j1"), good_token(issuer, jti="j2", sub="bob")
    for t in (t1, t2):
        auth.authenticate_at_time(f"Bearer {t}", required_scope="infer", now=NOW)
    revocation.revoke("j1")
    revocation.suspend("bob")
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(f"Bearer {t1}", required_scope="infer", now=NOW)
    assert info.value.message == INVALID_TOKEN_MESSAGE
    with pytest.raises(SuspendedError) as denied:
        auth.authenticate_at_time(f"Bearer {t2}", required_scope="infer", now=NOW)
    assert denied.value.message == "account suspended: contact the model owner"
    revocation.reinstate("bob")
    assert auth.authenticate_at_time(f"Bearer {t2}", required_scope="infer", now=NOW)


def test_cached_token_refused_once_its_key_is_withdrawn(issuer: TokenIssuer) -> None:
    source = MutableSource(issuer.jwks())
    auth = Authenticator(make_settings(), sources={ISS: source})
    header = f"Bearer {good_token(issuer)}"
    auth.authenticate_at_time(header, required_scope="infer", now=NOW)
    source.jwks = make_issuer().jwks()  # the issuer rotated the key away (compromise)
    source.refresh_now()
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(header, required_scope="infer", now=NOW)
    assert "is not in the JWKS" in info.value.log_detail


def test_cache_is_bounded(issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator(
        make_settings(cache_max_entries=2), sources={ISS: StaticJwksSource(issuer.jwks())}
    )
    tokens = [good_token(issuer, jti=f"j{i}") for i in range(3)]
    for t in tokens:
        auth.authenticate_at_time(f"Bearer {t}", required_scope="infer", now=NOW)
    assert len(auth._cache) == 2
    calls = count_decodes(monkeypatch)
    auth.authenticate_at_time(f"Bearer {tokens[2]}", required_scope="infer", now=NOW)
    assert calls[0] == 0
    auth.authenticate_at_time(f"Bearer {tokens[0]}", required_scope="infer", now=NOW)
    assert calls[0] == 1  # evicted, verified again


def test_cache_ttl_bounds_reuse(issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Authenticator(
        make_settings(cache_ttl_seconds=10), sources={ISS: StaticJwksSource(issuer.jwks())}
    )
    header = f"Bearer {good_token(issuer)}"
    auth.authenticate_at_time(header, required_scope="infer", now=NOW)
    calls = count_decodes(monkeypatch)
    auth.authenticate_at_time(header, required_scope="infer", now=NOW + 11)
    assert calls[0] == 1


def test_default_and_allowed_tiers(issuer: TokenIssuer) -> None:
    source = StaticJwksSource(issuer.jwks())
    auth = Authenticator(
        make_settings(default_tier="free", allowed_tiers=frozenset({"free", "pro"})),
        sources={ISS: source},
    )
    no_tier = jwt.encode(
        {
            "iss": ISS,
            "aud": AUD,
            "sub": "a",
            "iat": int(NOW),
            "exp": int(NOW) + 60,
            "jti": "x",
            "sealserve_tos": TOS,
            "scope": "infer",
        },
        issuer._key,
        algorithm="ES256",
        headers={"kid": issuer.kid},
    )
    assert auth.authenticate_at_time(f"Bearer {no_tier}", required_scope="infer", now=NOW).tier == (
        "free"
    )
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(
            f"Bearer {good_token(issuer, tier='gold')}", required_scope="infer", now=NOW
        )
    assert "tier 'gold' is not configured" in info.value.log_detail


def test_unknown_required_scope_is_a_server_bug(auth: Authenticator) -> None:
    with pytest.raises(ConfigError, match="unknown scope 'inference'"):
        auth.authenticate_at_time("Bearer x", required_scope="inference", now=NOW)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithms": ("none",)}, "'none' is not accepted"),
        ({"algorithms": ("ES256", "HS256")}, "'HS256' is not accepted"),
        ({"algorithms": ()}, "at least one accepted algorithm"),
        ({"leeway_seconds": 3600}, "leeway_seconds must be between 0 and 300"),
        ({"max_token_bytes": 10**6}, "max_token_bytes"),
        ({"required_tos_version": ""}, "terms-of-service version"),
        ({"audience": ""}, "non-empty audience"),
        ({"issuers": ()}, "at least one trusted issuer"),
        ({"jwks_min_refresh_seconds": 0.1}, "at least 1 second"),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "issuers": (IssuerSettings(ISS, jwks_url="https://keys.test/jwks"),),
        "audience": AUD,
        "required_tos_version": TOS,
    }
    base.update(overrides)
    with pytest.raises(ConfigError, match=message):
        AuthSettings(**base)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"jwks_url": "http://keys.example.com/jwks"}, "must use https"),
        ({"jwks_url": "ftp://127.0.0.1/jwks"}, "must use https"),
        ({"jwks_url": "https://k/j", "discover": True}, "exactly one of"),
    ],
)
def test_issuer_settings_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IssuerSettings(ISS, **kwargs)


def test_authenticator_needs_a_source_per_issuer() -> None:
    with pytest.raises(ConfigError, match="no key source for issuer"):
        Authenticator(make_settings(), sources={})


def test_describe_for_the_manifest() -> None:
    described = make_settings().describe()
    assert described["required_tos_version"] == TOS
    assert described["tos_claim"] == "sealserve_tos"
    assert described["issuers"] == [ISS]
    assert described["algorithms"] == ["ES256", "EdDSA", "RS256"]
    json.dumps(described)  # JSON-friendly
