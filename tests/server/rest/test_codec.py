"""The REST codec alone: JSON and binary-extension requests checked against the model's
metadata with the gRPC codec's limits; every bad input a TensorError naming it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from sealserve.errors import TensorError
from sealserve.server.rest.codec import decode_infer_request, encode_infer_response, quote
from sealserve.server.types import InferResponse, ModelInfo, TensorSpec

INFO = ModelInfo(
    name="m",
    version="1",
    versions=("1",),
    platform="onnxruntime_onnx",
    inputs=(
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("i", "INT8", (-1, 2)),
        TensorSpec("s", "BYTES", (-1,)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1, 3)), TensorSpec("t", "BYTES", (-1,))),
)
GOOD: list[dict[str, Any]] = [
    {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2, 3.5]},
    {"name": "i", "datatype": "INT8", "shape": [1, 2], "data": [[-1, 7]]},
    {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
]


def _decode(doc: Any, *, binary: bytes = b"", header_length: int | None = None,
            max_bytes: int = 1 << 20, max_json_bytes: int = 1 << 20) -> Any:  # fmt: skip
    head = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    if binary or header_length is not None:
        header_length = len(head) if header_length is None else header_length
    return decode_infer_request(
        head + binary, INFO, header_length=header_length, max_bytes=max_bytes,
        max_json_bytes=max_json_bytes,
    )  # fmt: skip


def _with(target: str, /, **change: Any) -> dict[str, Any]:
    inputs = [dict(t, **change) if t["name"] == target else t for t in GOOD]
    for t in inputs:
        for key in [k for k, v in t.items() if v is None]:
            del t[key]
    return {"inputs": inputs}


def test_json_request_decodes_to_numpy() -> None:
    got = _decode({"id": "r1", "inputs": GOOD, "outputs": [{"name": "y"}]})
    req = got.request
    assert req.id == "r1" and req.outputs == ("y",)
    np.testing.assert_array_equal(req.inputs["x"], np.array([[1.0, 2.0, 3.5]], np.float32))
    assert req.inputs["x"].dtype == np.float32
    assert req.inputs["i"].dtype == np.int8 and req.inputs["i"].tolist() == [[-1, 7]]
    assert req.inputs["s"].tolist() == ["héllo".encode()]
    assert not got.all_binary and got.binary_outputs == frozenset()


def test_binary_extension_decodes_and_sizes_must_agree() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    doc = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3],
             "parameters": {"binary_data_size": 24}},
            {"name": "i", "datatype": "INT8", "shape": [2, 2], "data": [1, 2, 3, 4]},
            {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    got = _decode(doc, binary=x.tobytes())
    np.testing.assert_array_equal(got.request.inputs["x"], x)
    assert got.binary_outputs == frozenset({"y"})
    with pytest.raises(TensorError, match=r"holds 25 bytes of binary data .* add up to 24"):
        _decode(doc, binary=x.tobytes() + b"!")
    with pytest.raises(TensorError, match="binary_data_size 24 runs past the 23 bytes"):
        _decode(doc, binary=x.tobytes()[:-1])
    with pytest.raises(TensorError, match="Inference-Header-Content-Length is 9999 but"):
        _decode(doc, binary=x.tobytes(), header_length=9999)
    doc["inputs"][0]["parameters"]["binary_data_size"] = 20
    with pytest.raises(TensorError, match=r"needs 24 bytes, binary data holds 20"):
        _decode(doc, binary=x.tobytes()[:20])
    doc["inputs"][0]["data"] = [1, 2, 3]
    with pytest.raises(TensorError, match="both binary_data_size and data are set"):
        _decode(doc, binary=x.tobytes()[:20])
    del doc["inputs"][0]["data"]
    with pytest.raises(TensorError, match="needs the Inference-Header-Content-Length"):
        decode_infer_request(
            json.dumps(doc).encode(), INFO, header_length=None, max_bytes=1 << 20,
            max_json_bytes=1 << 20,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b'{"inputs": [', "request body is not valid JSON"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
        ({"inputs": []}, "'inputs' must be a non-empty JSON array"),
        (
            _with("x", data=["1.0", "2", "3"]),
            "'x': data holds string values, datatype FP32 needs numbers",
        ),
        (_with("x", data=[1, None, 3]), "'x': data holds mixed or null values"),
        (_with("i", data=[1.5, 2]), "'i': data holds number values, datatype INT8 needs integers"),
        (_with("i", data=[1, 300]), "'i': values out of range for INT8"),
        (_with("s", data=[1]), "'s': data holds integer values, datatype BYTES needs strings"),
        (_with("x", data=[1, 2]), "'x': shape needs 3 elements, data holds 2"),
        (_with("x", data=[[1, 2], [3]]), "'x': data is not a regular array of FP32 values"),
        (_with("x", data=None), "'x': no data"),
        (_with("x", datatype="FP64"), "'x': expected datatype FP32, got 'FP64'"),
        (_with("x", shape=[3]), r"'x': expected rank 2 with shape \[-1, 3\], got rank 1"),
        (_with("x", shape=[1, 4]), r"'x': expected shape \[-1, 3\], got \[1, 4\]"),
        (_with("x", shape=[1, "3"]), "'x': shape must be a list of integers"),
        (_with("x", shape=[-1, 3]), "'x': negative dimension"),
        (
            _with("x", name="z" * 500),
            r"input 'zzzz.*\.\.\. \(500 chars\) is not an input of model 'm'",
        ),
        ({"inputs": GOOD + GOOD[:1]}, "'x' appears more than once"),
        ({"inputs": GOOD[:2]}, r"missing input\(s\): s"),
        (
            {"inputs": GOOD, "outputs": [{"name": "nope"}]},
            "requested output 'nope' is not an output",
        ),
        ({"inputs": GOOD, "id": 5}, "'id' must be a string, got int"),
    ],
)
def test_bad_requests_are_named(doc: Any, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        _decode(doc)


def test_size_limits() -> None:
    big = {"inputs": [dict(GOOD[0], shape=[100, 3], data=[0.0] * 300), *GOOD[1:]]}
    with pytest.raises(TensorError, match="exceed the size limit of 1024 bytes"):
        _decode(big, max_bytes=1024)
    strings = _with("s", shape=[2], data=["a" * 600, "b" * 600])
    with pytest.raises(TensorError, match="'s': request tensors exceed the size limit of 1024"):
        _decode(strings, max_bytes=1024)
    with pytest.raises(
        TensorError, match=r"JSON part of the request is \d+ bytes, over the limit of 1024"
    ):
        _decode(big, max_json_bytes=1024)


def test_response_json_and_binary() -> None:
    y = np.array([[0.5, 1.5, -2.0]], np.float32)
    resp = InferResponse("m", "1", {"y": y, "t": np.array([b"ok"], dtype=object)}, id="r1")
    body, header_length = encode_infer_response(resp)
    assert header_length is None
    doc = json.loads(body)
    assert doc["id"] == "r1" and doc["model_name"] == "m"
    assert doc["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [1, 3],
                                 "data": [0.5, 1.5, -2.0]}  # fmt: skip
    assert doc["outputs"][1]["data"] == ["ok"]
    body, header_length = encode_infer_response(resp, binary_outputs=frozenset({"y"}))
    assert header_length is not None
    head = json.loads(body[:header_length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert np.frombuffer(body[header_length:], np.float32).tolist() == y.reshape(-1).tolist()


def test_quote_is_short() -> None:
    assert quote("abc") == "'abc'"
    assert quote("x" * 100) == "'" + "x" * 32 + "'... (100 chars)"
