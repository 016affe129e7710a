"""Authentication on the wire: every RPC but health, reflection and GetEvidence needs
a token with the RPC's scope; tritonclient works with an authorization header."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.errors import AuthenticationError, PermissionDeniedError
from tests.conftest import sealserve_cmd, sealserve_env

ISS = "https://issuer.test.invalid"
AUD = "sealserve-test"
TOS = "2026-11"


@pytest.fixture
def issuer_and_auth(tmp_path: Path) -> tuple[TokenIssuer, dict[str, Any]]:
    pem, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    auth = {
        "audience": AUD,
        "required_tos_version": TOS,
        "issuers": [{"issuer": ISS, "jwks_file": str(tmp_path / "jwks.json")}],
    }
    return TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD), auth


def _token(issuer: TokenIssuer, scopes: list[str], tos: str = TOS) -> str:
    return issuer.issue("acct-1", tier="standard", scopes=scopes, tos_version=tos, ttl=600)


def test_scopes_enforced_per_rpc(start_server: Any, repo: Path, issuer_and_auth: Any) -> None:
    issuer, auth = issuer_and_auth
    running = start_server(model_repository=repo, unsafe_plaintext=True, auth=auth)
    x = {"input": np.zeros((1, 64), np.float32)}
    with Client(running.target, unsafe_plaintext=True) as anon:
        with pytest.raises(AuthenticationError, match="missing credentials"):
            anon.infer("digits", x)
        with pytest.raises(AuthenticationError):
            anon.model_metadata("digits")
    meta_only = _token(issuer, ["metadata"])
    with Client(running.target, unsafe_plaintext=True, token=meta_only) as c:
        assert c.model_metadata("digits").name == "digits"
        with pytest.raises(PermissionDeniedError, match="infer"):
            c.infer("digits", x)
    with (
        Client(
            running.target, unsafe_plaintext=True, token=_token(issuer, ["infer"], tos="2025-01")
        ) as c,
        pytest.raises(PermissionDeniedError, match=TOS),
    ):
        c.infer("digits", x)
    with Client(running.target, unsafe_plaintext=True, token=_token(issuer, ["infer"])) as c:
        assert c.infer("digits", x)["label"].shape == (1,)
    with (
        Client(running.target, unsafe_plaintext=True, token="Bearer.garbage.token") as c,
        pytest.raises(AuthenticationError, match="invalid or expired token"),
    ):
        c.infer("digits", x)
    # The server keeps serving after every refusal.
    with Client(running.target, unsafe_plaintext=True, token=_token(issuer, ["infer"])) as c:
        assert c.infer("digits", x)["label"].shape == (1,)


def test_health_and_reflection_need_no_token(
    start_server: Any, repo: Path, issuer_and_auth: Any
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, auth = issuer_and_auth
    running = start_server(model_repository=repo, unsafe_plaintext=True, auth=auth)
    with grpc.insecure_channel(running.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_unlisted_rpcs_need_admin_scope() -> None:
    from sealserve.server.grpc.auth_interceptor import scope_for

    assert scope_for("/inference.GRPCInferenceService/ModelInfer") == "infer"
    assert scope_for("/inference.GRPCInferenceService/ModelMetadata") == "metadata"
    assert scope_for("/grpc.health.v1.Health/Check") is None
    assert scope_for("/sealserve.v1.Attestation/GetEvidence") is None
    assert scope_for("/inference.GRPCInferenceService/ModelStatistics") == "admin"


@pytest.fixture
def served_with_auth(tmp_path: Path, issuer_and_auth: Any) -> Iterator[tuple[str, TokenIssuer]]:
    from tests.server import models

    issuer, _auth = issuer_and_auth
    repo = tmp_path / "models"
    models.matmul(repo)
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{repo}"\nport = 0\nunsafe_plaintext = true\nlog_format = "text"\n'
        f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
        f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n'
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"server did not start: {proc.stdout.read().decode() if proc.stdout else ''}"
            )
        time.sleep(0.05)
    yield f"127.0.0.1:{json.loads(ready.read_text())['port']}", issuer
    proc.terminate()
    proc.wait(15)


def test_tritonclient_with_authorization_header(served_with_auth: tuple[str, TokenIssuer]) -> None:
    tc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    target, issuer = served_with_auth
    token = _token(issuer, ["infer", "metadata"])
    client = tc.InferenceServerClient(target)
    inp = tc.InferInput("x", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("matmul", [inp])
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    headers = {"authorization": f"Bearer {token}"}
    assert client.is_model_ready("matmul", headers=headers)
    out = client.infer("matmul", [inp], headers=headers)
    assert out.as_numpy("y").shape == (1, 32)
