"""Shared helpers for auth tests: issuers, settings, a fake clock, a loopback server."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sealserve.auth import (
    Authenticator,
    AuthSettings,
    IssuerSettings,
    StaticJwksSource,
    TokenIssuer,
    generate_keypair,
)

ISS = "https://issuer.test"
AUD = "sealserve-test"
TOS = "2026-01"
NOW = 1_800_000_000.0


@functools.cache
def _rsa_pem() -> bytes:
    # RSA-3072 generation takes about a second: make one per test session.
    return generate_keypair("RS256")[0]


def make_issuer(alg: str = "ES256", *, issuer: str = ISS, audience: str = AUD) -> TokenIssuer:
    pem = _rsa_pem() if alg in ("RS256", "PS256") else generate_keypair(alg)[0]
    return TokenIssuer.from_pem(pem, issuer=issuer, audience=audience, algorithm=alg)


def make_settings(*issuers: str, **overrides: Any) -> AuthSettings:
    names = issuers or (ISS,)
    return AuthSettings(
        issuers=tuple(IssuerSettings(n, jwks_url="https://keys.invalid/jwks") for n in names),
        audience=AUD,
        required_tos_version=TOS,
        **overrides,
    )


def good_token(issuer: TokenIssuer, *, now: float = NOW, **kw: Any) -> str:
    args: dict[str, Any] = {
        "tier": "free",
        "scopes": ["infer", "metadata"],
        "tos_version": TOS,
        "ttl": 3600,
    }
    args.update(kw)
    sub = args.pop("sub", "alice")
    return issuer.issue_at_time(now, sub, **args)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def issuer() -> TokenIssuer:
    return make_issuer()


@pytest.fixture
def auth(issuer: TokenIssuer) -> Authenticator:
    return Authenticator(make_settings(), sources={ISS: StaticJwksSource(issuer.jwks())})


@dataclasses.dataclass(frozen=True)
class Redirect:
    location: str


class LoopbackServer:
    """An HTTP server on 127.0.0.1 that serves JSON routes and records every hit.

    ``stop()`` really closes the socket (connection refused); ``start()`` reopens it on
    the same port.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}
        self.hits: list[str] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hits.append(self.path)
                    body = owner.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if isinstance(body, Redirect):
                    self.send_response(302)
                    self.send_header("Location", body.location)
                    self.end_headers()
                    return
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return len(self.hits) if path is None else self.hits.count(path)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    # Loopback only: make sure no proxy from the environment is used.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    srv = LoopbackServer()
    srv.start()
    yield srv
    srv.stop()
