"""A real OIP client nobody here wrote (tritonclient.grpc) against `sealserve serve`,
in one process that also imports sealserve."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

import sealserve  # noqa: F401  (imported side by side with tritonclient on purpose)
from sealserve._proto import grpc_service_pb2  # noqa: F401
from tests.conftest import sealserve_cmd, sealserve_env

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.server import models

    tmp = tmp_path_factory.mktemp("serve")
    repo = tmp / "models"
    models.identity_all_types(repo)
    # FP16 has no typed-contents field in OIP, so the typed test uses a model without it.
    models.identity_all_types(repo, name="identity_typed", skip=("FP16",))
    models.matmul(repo)
    cfg = tmp / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{repo}"\nport = 0\nunsafe_plaintext = true\nlog_format = "text"\n'
        "unsafe_disable_auth = true\n"
    )
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.stdout else ""
            proc.kill()
            pytest.fail(f"sealserve serve did not start:\n{out}")
        time.sleep(0.05)
    port = json.loads(ready.read_text())["port"]
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(15)


def test_health_and_metadata(served: str) -> None:
    client = tc.InferenceServerClient(served)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("matmul")
    assert not client.is_model_ready("missing")
    meta = client.get_server_metadata()
    assert meta.name == "sealserve"
    mm = client.get_model_metadata("matmul")
    assert [i.name for i in mm.inputs] == ["x"]
    assert list(mm.inputs[0].shape) == [-1, 64]
    assert mm.outputs[0].datatype == "FP32"


def _all_types_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    vals = {
        "BOOL": np.array([[True, False, True], [False, False, True]]),
        "FP16": rng.standard_normal((2, 3)).astype(np.float16),
        "FP32": rng.standard_normal((2, 3)).astype(np.float32),
        "FP64": rng.standard_normal((2, 3)),
        "BYTES": np.array([[b"a", b"", b"caf\xc3\xa9"], [b"x", b"yz", b"0"]], dtype=np.object_),
    }
    for dt, np_dt in (("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
                      ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16),
                      ("INT32", np.int32), ("INT64", np.int64)):  # fmt: skip
        info = np.iinfo(np_dt)
        vals[dt] = np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=np_dt)
    return vals


@pytest.mark.parametrize("binary", [True, False], ids=["raw", "typed"])
def test_infer_every_datatype(served: str, binary: bool) -> None:
    client = tc.InferenceServerClient(served)
    inputs = []
    values = _all_types_inputs()
    for dt, arr in values.items():
        if dt == "FP16" and not binary:
            continue  # FP16 has no typed contents field in OIP
        inp = tc.InferInput(f"in_{dt}", list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    if binary:
        result = client.infer("identity", inputs)
    else:
        # tritonclient.grpc sends raw contents; build typed contents by hand to
        # exercise the typed path through the same client's transport.
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name="identity_typed")
        for dt, arr in values.items():
            if dt == "FP16":
                continue
            t = req.inputs.add(name=f"in_{dt}", datatype=dt, shape=arr.shape)
            field = {"BOOL": "bool_contents", "UINT64": "uint64_contents",
                     "INT64": "int64_contents", "FP32": "fp32_contents",
                     "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(
                dt, "uint_contents" if dt.startswith("UINT") else "int_contents")  # fmt: skip
            getattr(t.contents, field).extend(arr.reshape(-1).tolist())
        raw = client._client_stub.ModelInfer(req)
        result = tc.InferResult(raw)
    for dt, arr in values.items():
        if dt == "FP16" and not binary:
            continue
        got = result.as_numpy(f"out_{dt}")
        if dt == "BYTES":
            assert got.tolist() == arr.tolist()
        else:
            assert got.dtype == arr.dtype, dt
            np.testing.assert_array_equal(got, arr)


def test_error_paths(served: str) -> None:
    client = tc.InferenceServerClient(served)
    x = np.zeros((1, 10), np.float32)
    inp = tc.InferInput("x", [1, 10], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("matmul", [inp])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': expected shape [-1, 64], got [1, 10]" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [inp])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("matmul")  # Triton-only RPC
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    # And it still serves.
    ok = tc.InferInput("x", [2, 64], "FP32")
    ok.set_data_from_numpy(np.ones((2, 64), np.float32))
    assert client.infer("matmul", [ok]).as_numpy("y").shape == (2, 32)


def test_grpc_health_service(served: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(served: str) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="inference.GRPCInferenceService"
                ),
            ]
        )
        responses = list(stub.ServerReflectionInfo(reqs, timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto
