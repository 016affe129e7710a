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
