"""A hung state store (redis-server SIGSTOPped): admissions fail closed with UNAVAILABLE
within the deadline while health, metadata and evidence keep answering; after SIGCONT
admission resumes and nothing stored before the hang is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sealserve._proto import attestation_pb2 as apb
from sealserve._proto import attestation_pb2_grpc as apb_grpc
from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from sealserve.defense.store.redis import RedisStore
from sealserve.enclave.simulated import SimulatedPlatform
from tests._redis import RedisServer

DEADLINE_S = 0.3
LIMITS = {"default_tier": "t", "tiers": {"t": {"rate": 1000, "burst": 1000, "per_day": 100000}},
          "peer": {"per_minute": 100000}, "model": {"per_minute": 100000}}  # fmt: skip


def infer_request() -> pb.ModelInferRequest:
    x = np.zeros((1, 64), np.float32)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_hung_redis_fails_admission_closed_and_the_rest_keeps_answering(
    cluster: bool, own_redis: RedisServer, start_server: Any, repo: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    if cluster:
        hung_cluster = request.getfixturevalue("redis_cluster")
        url, proc = hung_cluster.url, hung_cluster.nodes
    else:
        url, proc = own_redis.url, [own_redis]
    SimulatedPlatform.create_root(tmp_path / "platform")
    running = start_server(
        model_repository=repo, state_store=url,
        state_store_prefix=f"hang{int(cluster)}", state_store_deadline_s=DEADLINE_S,
        limits=LIMITS, attestation_platform="simulated",
        simulated_platform_dir=tmp_path / "platform",
    )  # fmt: skip
    req = infer_request()
    assert running.server.tls is not None
    creds = grpc.ssl_channel_credentials(root_certificates=running.server.tls.cert_pem)
    with grpc.secure_channel(running.target, creds) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        evidence = apb_grpc.AttestationStub(ch)
        admitted = 0
        for _ in range(5):
            assert stub.ModelInfer(req, timeout=10).outputs
            admitted += 1
        for p in proc:
            assert p.proc is not None
            os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            # Admissions hammer the hung store meanwhile, from 4 threads.
            refused: list[tuple[grpc.StatusCode, str, float]] = []
            stop = threading.Event()

            def hammer() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        stub.ModelInfer(req, timeout=10)
                        refused.append((grpc.StatusCode.OK, "admitted", 0.0))
                    except grpc.RpcError as exc:
                        refused.append((exc.code(), exc.details(), time.perf_counter() - t0))

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            live = timed(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5), 100)
            meta = timed(
                lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=5), 100
            )
            checks = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5), 100)
            got = evidence.GetEvidence(apb.GetEvidenceRequest(nonce=os.urandom(32)), timeout=5)
            assert got.evidence
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            for p in proc:
                assert p.proc is not None
                os.kill(p.proc.pid, signal.SIGCONT)
        # Not a timing target (bench/bench_defended.py measures the p99): none of these
        # calls waits for the hung store, which would hold it past its 5 s timeout.
        for name, lat in (("ServerLive", live), ("ModelMetadata", meta), ("Health", checks)):
            assert len(lat) == 100 and lat[-1] < 1.0, f"{name} waited {lat[-1]:.2f} s"
        assert refused, "admissions were tried during the hang"
        codes = {code for code, _, _ in refused}
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
        assert all(
            detail == f"state store did not answer within {DEADLINE_S:g} s"
            for _, detail, _ in refused
        )
        slowest = max(took for _, _, took in refused)
        assert slowest < DEADLINE_S + 2.0, f"a refusal took {slowest:.2f} s (not the deadline)"
        # The store is back: admission resumes at once, and the usage counted before
        # the hang is still there (refusals during the hang may be counted too when a
        # script sent before the deadline runs late: fail closed, never extra).
        deadline = time.monotonic() + 10
        while True:
            try:
                assert stub.ModelInfer(req, timeout=10).outputs
                admitted += 1
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "admission did not resume"
                time.sleep(0.05)
    store = RedisStore.from_url(url, prefix=f"hang{int(cluster)}")
    quota = running.server.plane.guard.quota
    assert quota is not None
    left = {r.name: r.remaining for r in store.usage(quota.checks("anonymous", "t", None, None),
                                                       now=time.time())}  # fmt: skip
    assert 100000 - left["account.day"] >= admitted
    store.close()
