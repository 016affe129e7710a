"""TLS on by default (files or an in-memory key) and Prometheus metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve.client import Client
from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import UnavailableError


def test_ephemeral_tls_pinned_client(start_server: Any, repo: Path) -> None:
    running = start_server(model_repository=repo)
    tls = running.server.tls
    assert tls is not None and tls.ephemeral
    with Client(running.target, root_certificates=tls.cert_pem) as c:
        out = c.infer("digits", {"input": np.zeros((1, 64), np.float32)})
    assert out["probabilities"].shape == (1, 10)
    # A client that pins some other certificate refuses to talk.
    other = TlsIdentity.generate()
    with (
        Client(running.target, root_certificates=other.cert_pem, timeout=5) as c,
        pytest.raises(UnavailableError),
    ):
        c.server_ready()


def test_tls_from_files(start_server: Any, repo: Path, tmp_path: Path) -> None:
    ident = TlsIdentity.generate()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(ident.cert_pem)
    key.write_bytes(ident.key_pem)
    running = start_server(model_repository=repo, tls_cert_file=cert, tls_key_file=key)
    assert running.server.tls is not None and not running.server.tls.ephemeral
    with Client(running.target, root_certificates=ident.cert_pem) as c:
        assert c.server_ready()


def test_metrics_endpoint(start_server: Any, repo: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = start_server(model_repository=repo, unsafe_plaintext=True, metrics_port=port)
    with Client(running.target, unsafe_plaintext=True) as c:
        for _ in range(3):
            c.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        with pytest.raises(Exception):
            c.infer("digits", {"input": np.zeros((1, 3), np.float32)})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert (
        'sealserve_requests_total{code="OK",model="digits",protocol="grpc",version="1"} 3.0' in body
    )
    assert (
        'sealserve_requests_total{code="INVALID_ARGUMENT",model="digits",protocol="grpc",version="1"} 1.0'
        in body
    )
    assert "sealserve_request_latency_seconds_bucket" in body
    assert "sealserve_batch_size_bucket" in body


def test_plaintext_health_port_serves_health_only(start_server: Any, repo: Path) -> None:
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sealserve._proto import grpc_service_pb2 as pb
    from sealserve._proto import grpc_service_pb2_grpc as pb_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_server(model_repository=repo, health_port=port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no data on this port
