"""A sealserve server with auth on and the REST port open, plus tokens for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealserve.auth import TokenIssuer, generate_keypair

ISS, AUD, TOS = "https://issuer.test.invalid", "sealserve-test", "2026-11"


@dataclass
class Rest:
    running: Any
    issuer: TokenIssuer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.server.rest_port}"

    @property
    def port(self) -> int:
        return int(self.running.server.rest_port)

    def token(
        self, account: str = "acct-1", scopes: tuple[str, ...] = ("infer", "metadata")
    ) -> str:
        return self.issuer.issue(
            account, tier="standard", scopes=list(scopes), tos_version=TOS, ttl=600
        )

    def headers(self, account: str = "acct-1", **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(account, **kw)}"}


@pytest.fixture
def auth_config(tmp_path: Path) -> tuple[TokenIssuer, dict[str, Any]]:
    pem, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    auth = {"audience": AUD, "required_tos_version": TOS,
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp_path / "jwks.json")}]}  # fmt: skip
    return TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD), auth


@pytest.fixture
def rest_server(start_server: Any, repo: Path, auth_config: Any) -> Any:
    """``rest_server(**settings)``: plaintext unless told otherwise, auth on."""
    issuer, auth = auth_config

    def _start(rest: dict[str, Any] | None = None, **kw: Any) -> Rest:
        kw.setdefault("unsafe_plaintext", True)
        kw.setdefault("model_repository", repo)
        running = start_server(auth=auth, rest={"port": 0, **(rest or {})}, **kw)
        return Rest(running, issuer)

    return _start
