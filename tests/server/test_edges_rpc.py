"""The edges on the wire: undecodable bodies, public liveness, the GetEvidence rate,
the answer while models load, and the auth wrapper's method cache."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sealserve._proto import attestation_pb2 as apb
from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from sealserve.auth import generate_keypair
from sealserve.server.app import Server
from sealserve.server.grpc.auth_interceptor import UNDECODABLE_MESSAGE
from sealserve.server.settings import Settings

ISS = "https://issuer.test.invalid"
AUD = "sealserve-test"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def auth(tmp_path: Path) -> dict[str, Any]:
    _, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    return {"audience": AUD, "required_tos_version": "1",
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp_path / "jwks.json")}]}  # fmt: skip


def _raw_call(target: str, method: str, body: bytes, metadata: Any = None) -> grpc.RpcError:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=10, metadata=metadata)
    return info.value


GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\x0f"  # a varint that never ends


def test_garbage_body_is_invalid_argument_without_traceback(
    start_server: Any, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_server(model_repository=repo, unsafe_plaintext=True)
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        err = _raw_call(running.target, INFER, GARBAGE)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details() == UNDECODABLE_MESSAGE
        assert "DecodeError" not in err.details()
    # Health too (public): the same fixed answer.
    err = _raw_call(running.target, "/grpc.health.v1.Health/Check", GARBAGE)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = [r for r in caplog.records if "undecodable" in r.getMessage()]
    # Once per peer per interval, never a traceback, never an ERROR.
    assert len(records) == 1, [r.getMessage() for r in records]
    assert all(r.exc_info is None and r.levelno < logging.ERROR for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_garbage_body_without_token_is_unauthenticated(
    start_server: Any, repo: Path, auth: dict[str, Any]
) -> None:
    # The body check comes after authentication: an anonymous caller learns nothing.
    running = start_server(model_repository=repo, unsafe_plaintext=True, auth=auth)
    err = _raw_call(running.target, INFER, GARBAGE)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()


def test_liveness_is_public_by_default_and_configurable(
    start_server: Any, repo: Path, auth: dict[str, Any]
) -> None:
    public = start_server(model_repository=repo, unsafe_plaintext=True, auth=auth)
    with grpc.insecure_channel(public.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    private = start_server(
        model_repository=repo, unsafe_plaintext=True, auth=auth, public_liveness=False
    )
    with grpc.insecure_channel(private.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for rpc, req in ((stub.ServerLive, pb.ServerLiveRequest()),
                         (stub.ServerReady, pb.ServerReadyRequest())):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                rpc(req, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_get_evidence_is_rate_limited_per_peer(
    start_server: Any, repo: Path, sim_root: Path
) -> None:
    running = start_server(
        model_repository=repo,
        attestation_platform="simulated",
        simulated_platform_dir=sim_root,
        evidence_per_peer_per_minute=3,
    )
    assert running.server.tls is not None
    creds = grpc.ssl_channel_credentials(root_certificates=running.server.tls.cert_pem)
    options = [("grpc.ssl_target_name_override", "sealserve.attested")]
    with grpc.secure_channel(running.target, creds, options=options) as ch:
        get = ch.unary_unary(
            "/sealserve.v1.Attestation/GetEvidence",
            request_serializer=apb.GetEvidenceRequest.SerializeToString,
            response_deserializer=apb.GetEvidenceResponse.FromString,
        )
        for _ in range(3):
            assert get(apb.GetEvidenceRequest(nonce=b"n" * 32), timeout=30).evidence
        with pytest.raises(grpc.RpcError) as info:
            get(apb.GetEvidenceRequest(nonce=b"n" * 32), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "evidence rate limit" in info.value.details()
    retry = dict(info.value.trailing_metadata() or ())["retry-after"]
    assert 1 <= int(retry) <= 20


def test_model_infer_while_loading_is_unavailable_with_retry_hint(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealserve.server.engine import Engine

    release = threading.Event()
    real_load = Engine.load

    def slow_load(self: Engine, *args: Any) -> None:
        release.wait(30)
        real_load(self, *args)

    monkeypatch.setattr(Engine, "load", slow_load)
    settings = Settings.load(
        None, port=0, model_repository=repo, unsafe_plaintext=True, unsafe_disable_auth=True
    )
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            box["server"] = Server(settings)
            await box["server"].start()

        loop.run_until_complete(boot())
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while (box.get("server") is None or box["server"].port == 0) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        server = box["server"]
        x = np.zeros((1, 64), np.float32)
        req = pb.ModelInferRequest(model_name="digits")
        req.inputs.add(name="input", datatype="FP32", shape=x.shape)
        req.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "loading" in info.value.details()
            assert dict(info.value.trailing_metadata() or ())["retry-after"] == "2"
            release.set()
            deadline = time.monotonic() + 30
            while not server.plane.ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stub.ModelInfer(req, timeout=10).outputs
    finally:
        release.set()
        if "server" in box:
            asyncio.run_coroutine_threadsafe(box["server"].stop(grace=0.1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_unknown_method_paths_are_not_cached() -> None:
    from collections import namedtuple

    from sealserve.server.grpc.auth_interceptor import Authenticating
    from sealserve.server.grpc.per_peer import PeerLog
    from sealserve.server.metrics import Metrics

    inner = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ServerLive": grpc.unary_unary_rpc_method_handler(lambda r, c: r)},
    )
    wrapper = Authenticating(
        inner, None, Metrics(), undecodable_log=PeerLog(logging.getLogger("t"))
    )
    details = namedtuple("details", "method invocation_metadata")
    for i in range(20_000):
        assert wrapper.service(details(f"/x.Y/Z{i}", ())) is None
    assert wrapper.service(details("/inference.GRPCInferenceService/ServerLive", ()))
    assert len(wrapper._wrapped) == 1


def test_refused_admission_never_decodes_and_is_remembered_for_a_second() -> None:
    from sealserve.defense.guard import Caller
    from sealserve.errors import RateLimitedError, SuspendedError
    from sealserve.server.dataplane import DataPlane, PendingRequest, RecentRefusals

    class RefusingGuard:
        idle = False  # it has limits to apply

        def to_compute(self, model: str, requested: tuple[str, ...]) -> tuple[str, ...]:
            return requested

        async def admit_async(self, *args: Any, **kwargs: Any) -> Any:
            raise RateLimitedError("account day quota exhausted", retry_after=30.0)

        def audit_refusal(self, *args: Any) -> None:
            audited.append(args)

    audited: list[Any] = []
    plane = DataPlane(None, server_name="s", max_request_bytes=1024)  # type: ignore[arg-type]
    plane.guard = RefusingGuard()  # type: ignore[assignment]
    decoded: list[int] = []

    def decode() -> Any:
        decoded.append(1)
        raise AssertionError("tensors decoded for a refused request")

    caller = Caller("greedy", "t", "127.0.0.1")
    with pytest.raises(RateLimitedError):
        asyncio.run(plane.infer_pending(PendingRequest("m", 4, decode, outputs=()), caller))
    assert decoded == []
    with pytest.raises(RateLimitedError, match="quota exhausted") as info:
        plane.refused_recently("greedy")
    assert info.value.retry_after is not None and 29 < info.value.retry_after <= 30
    plane.refused_recently("someone-else")  # others are not affected

    now = [100.0]
    memo = RecentRefusals(hold_s=1.0, clock=lambda: now[0])
    memo.remember("a", RateLimitedError("account rate limit exceeded", retry_after=5.0))
    with pytest.raises(RateLimitedError):
        memo.check("a")
    now[0] += 1.01  # a reset quota is seen within the hold
    memo.check("a")
    memo.remember("b", SuspendedError("account is suspended"))
    memo.check("b")  # never remembered: a lift takes effect at once
