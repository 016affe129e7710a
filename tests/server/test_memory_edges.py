"""Memory a hostile client can make the server hold, measured on a `sealserve serve`
subprocess through /proc (peak RSS reset with clear_refs): BYTES inputs cost O(request
bytes), and unknown method paths are not remembered."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import sealserve_cmd, sealserve_env
from tests.server import models


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, str]]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/PID/clear_refs to measure peak RSS")
    repo = tmp_path / "models"
    repo.mkdir()
    skip = tuple(dt for dt in models.DTYPES if dt != "BYTES")
    models.identity_all_types(repo, name="text", skip=skip)
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        'model_repository = "models"\nport = 0\nunsafe_plaintext = true\n'
        'unsafe_disable_auth = true\nattestation_platform = "none"\nharden_process = false\n'
        'log_level = "warning"\n'
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield proc.pid, f"127.0.0.1:{json.loads(ready.read_text())['port']}"
    finally:
        proc.terminate()
        proc.wait(15)


def _bytes_request(elements: list[bytes]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="text")
    req.inputs.add(name="in_BYTES", datatype="BYTES", shape=[len(elements) // 3, 3])
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    return req


def test_bytes_request_peak_rss_is_at_most_10x_its_size(served: tuple[int, str]) -> None:
    pid, target = served
    # One long element among many short ones: a fixed-width array pads every element
    # to the longest (here ~1,000 x 4 x 88 KB = 350 MB).
    elements = [b"x" * 88_000] + [b"abcd"] * 1001
    req = _bytes_request(elements)
    size = req.ByteSize()
    assert 90_000 < size < 100_000
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        # Warm with the same long element but few short ones: the code paths, the
        # connection and the allocator's free space for one long element exist before
        # measuring; what is left to measure is what the element count costs.
        warm = _bytes_request([b"a" * 88_000] + [b"abcd"] * 5)
        for _ in range(3):
            stub.ModelInfer(warm, timeout=30)
        time.sleep(0.2)
        _reset_peak(pid)
        before = _status(pid, "VmRSS")
        out = stub.ModelInfer(req, timeout=60)
        peak = _status(pid, "VmHWM")
    assert len(out.raw_output_contents[0]) == len(req.raw_input_contents[0])
    growth = peak - before
    assert growth <= 10 * size, f"peak RSS grew {growth} bytes for a {size}-byte request"


def test_unknown_method_paths_do_not_grow_the_server(served: tuple[int, str]) -> None:
    pid, target = served
    with grpc.insecure_channel(target) as ch:

        def unknown(i: int) -> None:
            call = ch.unary_unary(f"/evil.Service/M{i:06d}", request_serializer=None,
                                  response_deserializer=None)  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

        for i in range(2_000):  # warm: allocator arenas, the connection, gRPC's tables
            unknown(i)
        before = _status(pid, "VmRSS")
        for i in range(2_000, 22_000):
            unknown(i)
        after = _status(pid, "VmRSS")
    growth = after - before
    assert growth <= 5 * 1024 * 1024, f"RSS grew {growth} bytes over 20,000 unknown paths"


def test_over_quota_64_mib_request_is_refused_before_its_body(tmp_path: Path) -> None:
    """An account already over its quota sends 64 MiB: refused (RESOURCE_EXHAUSTED)
    with the server's peak RSS growing by at most 10 MiB (the body is not read)."""
    import numpy as np

    from sealserve import demo
    from sealserve.auth import TokenIssuer, generate_keypair

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/PID/clear_refs to measure peak RSS")
    import shutil

    shutil.copytree(demo.repository(), tmp_path / "models")
    pem, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    issuer = TokenIssuer.from_pem(pem, issuer="https://i.invalid", audience="a")
    token = issuer.issue("greedy", tier="t", scopes=["infer"], tos_version="1", ttl=600)
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        'model_repository = "models"\nport = 0\nunsafe_plaintext = true\n'
        'attestation_platform = "none"\nharden_process = false\nlog_level = "warning"\n'
        f"max_request_bytes = {80 << 20}\n"
        'state_store = "memory:"\n[limits.tiers.t]\nper_day = 1\n'
        '[auth]\naudience = "a"\nrequired_tos_version = "1"\n'
        '[[auth.issuers]]\nissuer = "https://i.invalid"\njwks_file = "jwks.json"\n'
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"

        def request(rows: int) -> pb.ModelInferRequest:
            x = np.zeros((rows, 64), np.float32)
            req = pb.ModelInferRequest(model_name="digits")
            req.inputs.add(name="input", datatype="FP32", shape=x.shape)
            req.raw_input_contents.append(x.tobytes())
            return req

        big = request((64 << 20) // 256)
        meta = (("authorization", f"Bearer {token}"),)
        options = [("grpc.max_send_message_length", 100 << 20)]
        with grpc.insecure_channel(target, options=options) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(request(1), timeout=30, metadata=meta)  # the day's one request
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request(1), timeout=30, metadata=meta)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _reset_peak(proc.pid)
            before = _status(proc.pid, "VmRSS")
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(big, timeout=60, metadata=meta)
            peak = _status(proc.pid, "VmHWM")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "quota" in info.value.details()
        growth = peak - before
        assert growth <= 10 << 20, f"peak RSS grew {growth >> 20} MiB refusing 64 MiB"
    finally:
        proc.terminate()
        proc.wait(15)
