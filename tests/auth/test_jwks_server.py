"""Keys from a local JWKS HTTP server on 127.0.0.1: rotation, outage, rate limits, OIDC."""

from __future__ import annotations

import time

import pytest

from sealserve.auth import (
    INVALID_TOKEN_MESSAGE,
    Authenticator,
    AuthSettings,
    IssuerSettings,
    TokenIssuer,
    UrlJwksSource,
)
from sealserve.errors import AuthenticationError, ConfigError
from tests.auth.conftest import (
    AUD,
    ISS,
    NOW,
    TOS,
    FakeClock,
    LoopbackServer,
    Redirect,
    good_token,
    make_issuer,
    make_settings,
)

JWKS = "/jwks.json"


def url_auth(
    server: LoopbackServer, clock: FakeClock, **kw: float
) -> tuple[Authenticator, UrlJwksSource]:
    source = UrlJwksSource(
        server.url + JWKS,
        refresh_interval=kw.get("refresh_interval", 300.0),
        min_refresh=kw.get("min_refresh", 30.0),
        timeout=2.0,
        max_stale=kw.get("max_stale", 3600.0),
        clock=clock,
    )
    source.refresh_now()  # what start() does, without the background thread
    return Authenticator(make_settings(), sources={ISS: source}), source


def ok(auth: Authenticator, issuer: TokenIssuer, **kw: object) -> None:
    principal = auth.authenticate_at_time(
        f"Bearer {good_token(issuer, **kw)}", required_scope="infer", now=NOW
    )
    assert principal.account == "alice"


def refused(auth: Authenticator, issuer: TokenIssuer) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_at_time(f"Bearer {good_token(issuer)}", required_scope="infer", now=NOW)
    assert info.value.message == INVALID_TOKEN_MESSAGE
    return info.value


def test_keys_rotate_mid_run_and_calls_keep_succeeding(server: LoopbackServer) -> None:
    old, new = make_issuer(), make_issuer()
    server.routes[JWKS] = old.jwks()
    clock = FakeClock()
    auth, source = url_auth(server, clock)
    for _ in range(3):
        ok(auth, old)
    # 1. The issuer publishes the new key next to the old one, then signs with it.
    server.routes[JWKS] = {"keys": old.jwks()["keys"] + new.jwks()["keys"]}
    clock.advance(31)
    for _ in range(3):
        ok(auth, new)  # the first call's unknown kid refreshes once; later calls hit cache
        ok(auth, old)  # tokens still in flight keep working
    # 2. The old key is withdrawn; the periodic refresh picks that up.
    server.routes[JWKS] = new.jwks()
    clock.advance(300)
    assert source.refresh_now()
    for _ in range(3):
        ok(auth, new)
    assert "is not in the JWKS" in refused(auth, old).log_detail
    assert server.count(JWKS) == 3  # initial, one unknown-kid refresh, one periodic


def test_background_thread_picks_up_rotation(server: LoopbackServer) -> None:
    old, new = make_issuer(), make_issuer()
    server.routes[JWKS] = old.jwks()
    source = UrlJwksSource(server.url + JWKS, refresh_interval=0.05, min_refresh=0.05, timeout=2)
    auth = Authenticator(make_settings(), sources={ISS: source})
    auth.start()
    try:
        ok(auth, old)
        server.routes[JWKS] = new.jwks()
        deadline = time.monotonic() + 20
        while source.kids() != {new.kid} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert source.kids() == {new.kid}
        ok(auth, new)
    finally:
        auth.close()


def test_issuer_down_cached_keys_keep_serving(server: LoopbackServer) -> None:
    issuer = make_issuer()
    server.routes[JWKS] = issuer.jwks()
    clock = FakeClock()
    auth, source = url_auth(server, clock)
    ok(auth, issuer)
    server.stop()
    for _ in range(5):
        clock.advance(301)
        assert not source.refresh_now()  # the periodic refresh fails...
        ok(auth, issuer, jti=f"fresh-{clock.now}")  # ...and fresh tokens still verify
    stranger = make_issuer()
    clock.advance(31)
    refused(auth, stranger)  # an unknown kid during the outage: refused, not crashed
    server.start()
    assert source.refresh_now()
    ok(auth, issuer)
    assert server.count(JWKS) == 2


def test_cached_keys_expire_after_max_stale(server: LoopbackServer) -> None:
    issuer = make_issuer()
    server.routes[JWKS] = issuer.jwks()
    clock = FakeClock()
    auth, _source = url_auth(server, clock, max_stale=3600)
    ok(auth, issuer)
    server.stop()
    clock.advance(3601)
    error = refused(auth, issuer)
    assert "is not in the JWKS" in error.log_detail
    server.start()
    clock.advance(31)
    ok(auth, issuer, jti="after-outage")  # the unknown kid triggers one refresh, which works


def test_unknown_kid_refresh_is_rate_limited(server: LoopbackServer) -> None:
    issuer = make_issuer()
    server.routes[JWKS] = issuer.jwks()
    clock = FakeClock()
    auth, _source = url_auth(server, clock, min_refresh=30)
    assert server.count(JWKS) == 1
    clock.advance(31)
    for _ in range(50):
        refused(auth, make_issuer())  # a flood of tokens with unknown kids
        clock.advance(0.1)
    assert server.count(JWKS) == 2  # one refresh, not one per request
    clock.advance(30)
    refused(auth, make_issuer())
    assert server.count(JWKS) == 3
    ok(auth, issuer)  # known kid: no fetch
    assert server.count(JWKS) == 3


def test_oidc_discovery(server: LoopbackServer) -> None:
    issuer_url = server.url
    issuer = make_issuer(issuer=issuer_url)
    server.routes["/.well-known/openid-configuration"] = {
        "issuer": issuer_url,
        "jwks_uri": f"{server.url}/keys",
    }
    server.routes["/keys"] = issuer.jwks()
    settings = AuthSettings(
        issuers=(IssuerSettings(issuer_url, discover=True),),
        audience=AUD,
        required_tos_version=TOS,
    )
    with Authenticator.from_settings(settings) as auth:
        principal = auth.authenticate(
            f"Bearer {issuer.issue('bob', tier='t', scopes=['infer'], tos_version=TOS, ttl=60)}",
            required_scope="infer",
        )
        assert principal.account == "bob"
        assert principal.issuer == issuer_url
    assert server.count("/.well-known/openid-configuration") == 1


def test_oidc_discovery_with_mismatched_issuer_is_not_trusted(server: LoopbackServer) -> None:
    issuer = make_issuer(issuer=server.url)
    server.routes["/.well-known/openid-configuration"] = {
        "issuer": "https://elsewhere.test",
        "jwks_uri": f"{server.url}/keys",
    }
    server.routes["/keys"] = issuer.jwks()
    source = UrlJwksSource.from_oidc_issuer(server.url, timeout=2)
    assert not source.refresh_now()
    assert source.kids() == frozenset()
    assert server.count("/keys") == 0


def test_http_errors_and_redirects_leave_no_keys(server: LoopbackServer) -> None:
    issuer = make_issuer()
    server.routes["/keys"] = issuer.jwks()
    server.routes["/moved"] = Redirect(f"{server.url}/keys")
    for path in ("/missing", "/moved"):
        source = UrlJwksSource(server.url + path, timeout=2)
        assert not source.refresh_now()  # logged, no keys, no crash
        assert source.kids() == frozenset()
    assert server.count("/keys") == 0  # the redirect was not followed


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="must use https"):
        UrlJwksSource("http://keys.example.com/jwks.json")
