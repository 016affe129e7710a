"""The bad-input matrix: each malformed request gets a specific status and message,
and the server answers a valid request right after."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc


def _digits_request(x: np.ndarray | None = None) -> pb.ModelInferRequest:
    x = np.zeros((1, 64), np.float32) if x is None else x
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def _mutate(fn: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
    req = _digits_request()
    fn(req)
    return req


def _typed_and_raw(req: pb.ModelInferRequest) -> None:
    req.inputs[0].contents.fp32_contents.extend([0.0] * 64)


def _wrong_len(req: pb.ModelInferRequest) -> None:
    req.raw_input_contents[0] = b"\x00" * 255


def _extra_input(req: pb.ModelInferRequest) -> None:
    req.inputs.add(name="bogus", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\x00" * 4)


def _missing_input(req: pb.ModelInferRequest) -> None:
    del req.inputs[:]
    del req.raw_input_contents[:]


def _unknown_output(req: pb.ModelInferRequest) -> None:
    req.outputs.add(name="logits")


def _wrong_dtype(req: pb.ModelInferRequest) -> None:
    req.inputs[0].datatype = "FP64"
    req.raw_input_contents[0] = b"\x00" * 512


def _wrong_rank(req: pb.ModelInferRequest) -> None:
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([64])


def _wrong_dim(req: pb.ModelInferRequest) -> None:
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([2, 32])


def _too_large(req: pb.ModelInferRequest) -> None:
    x = np.zeros((2048, 64), np.float32)  # 512 KiB > the 256 KiB limit below
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend(x.shape)
    req.raw_input_contents[0] = x.tobytes()


def _typed_count(req: pb.ModelInferRequest) -> None:
    del req.raw_input_contents[:]
    req.inputs[0].contents.fp32_contents.extend([0.0] * 63)


def _empty_batch(req: pb.ModelInferRequest) -> None:
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([0, 64])
    req.raw_input_contents[0] = b""


def _negative_dim(req: pb.ModelInferRequest) -> None:
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([-1, 64])


CASES: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]] = [
    ("unknown model", pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND,
     "model 'nope' is not served"),
    ("unknown version", _mutate(lambda r: setattr(r, "model_version", "7")),
     grpc.StatusCode.NOT_FOUND, "has no version '7'"),
    ("wrong dtype", _mutate(_wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': expected datatype FP32, got FP64"),
    ("wrong rank", _mutate(_wrong_rank), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': expected rank 2"),
    ("wrong dims", _mutate(_wrong_dim), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'input': expected shape [-1, 64], got [2, 32]"),
    ("negative dim", _mutate(_negative_dim), grpc.StatusCode.INVALID_ARGUMENT,
     "negative dimension"),
    ("empty batch", _mutate(_empty_batch), grpc.StatusCode.INVALID_ARGUMENT,
     "has no rows (batch size 0)"),
    ("raw length", _mutate(_wrong_len), grpc.StatusCode.INVALID_ARGUMENT,
     "needs 256 bytes, raw contents hold 255"),
    ("raw and typed", _mutate(_typed_and_raw), grpc.StatusCode.INVALID_ARGUMENT,
     "both raw_input_contents and typed contents"),
    ("typed count", _mutate(_typed_count), grpc.StatusCode.INVALID_ARGUMENT,
     "typed contents hold 63"),
    ("missing input", _mutate(_missing_input), grpc.StatusCode.INVALID_ARGUMENT,
     "missing input(s): input"),
    ("extra input", _mutate(_extra_input), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'bogus' is not an input of model 'digits'"),
    ("unknown output", _mutate(_unknown_output), grpc.StatusCode.INVALID_ARGUMENT,
     "requested output 'logits' is not an output"),
    ("over size limit", _mutate(_too_large), grpc.StatusCode.INVALID_ARGUMENT,
     "exceed the size limit of 262144 bytes"),
]  # fmt: skip


@pytest.fixture
def stub(start_server: Any, repo: Path) -> Any:
    running = start_server(
        model_repository=repo, unsafe_plaintext=True, max_request_bytes=256 * 1024
    )
    channel = grpc.insecure_channel(running.target)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _valid_still_works(stub: Any) -> None:
    resp = stub.ModelInfer(_digits_request(), timeout=10)
    assert [o.name for o in resp.outputs] == ["label", "probabilities"]


@pytest.mark.parametrize(("case", "request_", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_refused_then_serving(
    stub: Any, case: str, request_: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    _valid_still_works(stub)


def test_onnxruntime_failure_is_internal_and_generic(stub: Any) -> None:
    req = pb.ModelInferRequest(model_name="reshape3")
    x = np.zeros((1, 4), np.float32)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert details.startswith("internal error (incident ")
    assert "Reshape" not in details and "onnxruntime" not in details.lower()
    _valid_still_works(stub)


def test_bytes_raw_contents_malformed(stub: Any) -> None:
    req = pb.ModelInferRequest(model_name="identity")
    for dt in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
               "INT64", "FP16", "FP32", "FP64"):  # fmt: skip
        arr = np.zeros((1, 3), dtype=_np(dt))
        req.inputs.add(name=f"in_{dt}", datatype=dt, shape=[1, 3])
        req.raw_input_contents.append(arr.tobytes())
    req.inputs.add(name="in_BYTES", datatype="BYTES", shape=[1, 3])
    req.raw_input_contents.append(b"\x05\x00\x00\x00ab")  # claims 5 bytes, holds 2
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_BYTES'" in info.value.details()
    _valid_still_works(stub)


def _np(dt: str) -> np.dtype[Any]:
    from sealserve.tensors import OIP_TO_NUMPY

    return OIP_TO_NUMPY[dt]


def _long_shape(req: pb.ModelInferRequest) -> None:
    del req.inputs[0].shape[:]
    req.inputs[0].shape.extend([1] * 8192)


def _long_input_name(req: pb.ModelInferRequest) -> None:
    req.inputs[0].name = "n" * 65536


def _long_output_name(req: pb.ModelInferRequest) -> None:
    req.outputs.add(name="o" * 65536)


def _long_datatype(req: pb.ModelInferRequest) -> None:
    req.inputs[0].datatype = "D" * 65536


LONG_ECHOES: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]] = [
    ("64 KiB model name", pb.ModelInferRequest(model_name="m" * 65536),
     grpc.StatusCode.NOT_FOUND, "(65536 chars) is not served"),
    ("64 KiB version", _mutate(lambda r: setattr(r, "model_version", "v" * 65536)),
     grpc.StatusCode.NOT_FOUND, "has no version 'vvvv"),
    ("8192-dim shape", _mutate(_long_shape), grpc.StatusCode.INVALID_ARGUMENT,
     "got shape [1, 1, 1, 1, 1, 1, 1, 1, ...] (8192 dims)"),
    ("64 KiB input name", _mutate(_long_input_name), grpc.StatusCode.INVALID_ARGUMENT,
     "(65536 chars) is not an input of model 'digits'"),
    ("64 KiB output name", _mutate(_long_output_name), grpc.StatusCode.INVALID_ARGUMENT,
     "(65536 chars) is not an output of model 'digits'"),
    ("64 KiB datatype", _mutate(_long_datatype), grpc.StatusCode.INVALID_ARGUMENT,
     "expected datatype FP32, got 'DDDD"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), LONG_ECHOES, ids=[c[0] for c in LONG_ECHOES]
)
def test_long_client_input_is_quoted_short(
    stub: Any, case: str, request_: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> None:
    # Echoed whole, the message would exceed the client's metadata limit and the client
    # would see RESOURCE_EXHAUSTED instead of the real answer.
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, timeout=10)
    assert info.value.code() == code, info.value.details()[:200]
    assert message in info.value.details()
    assert len(info.value.details()) < 400
    _valid_still_works(stub)


def test_just_over_the_cap_plus_a_mebibyte_is_invalid_argument(stub: Any) -> None:
    # Before: gRPC's own limit was the cap + 1 MiB, so this got RESOURCE_EXHAUSTED.
    rows = (256 * 1024 + (1 << 20) + 4096) // 256
    x = np.zeros((rows, 64), np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_digits_request(x), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details() == (
        "input 'input': request tensors exceed the size limit of 262144 bytes"
    )
    _valid_still_works(stub)
