"""Real OIP REST clients nobody here wrote against the REST port, auth on:
tritonclient.http (JSON and binary tensors) and the KServe V2 REST wire format as its
docs show it, sent with httpx (KServe's own client: test_kserve_client.py)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_every_datatype(rest_server: Any, binary: bool) -> None:
    rest = rest_server()
    client = th.InferenceServerClient(rest.target)
    h = rest.headers()
    assert client.is_server_live(headers=h) and client.is_server_ready(headers=h)
    assert client.is_model_ready("identity", headers=h)
    assert client.get_server_metadata(headers=h)["name"] == "sealserve"
    meta = client.get_model_metadata("identity", headers=h)
    assert {i["name"] for i in meta["inputs"]} == {f"in_{dt}" for dt in [*TYPES, "BYTES"]}
    rng = np.random.default_rng(0)
    inputs, want = [], {}
    for dt, np_type in TYPES.items():
        value = rng.integers(0, 100, (2, 3)) if dt != "BOOL" else rng.integers(0, 2, (2, 3))
        arr = value.astype(np_type)
        if dt == "FP16" and not binary:
            continue  # tritonclient refuses FP16 as JSON (no JSON form in its codec)
        t = th.InferInput(f"in_{dt}", [2, 3], dt)
        t.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(t)
        want[f"out_{dt}"] = arr
    s = np.array([[b"a", b"bc", b""], [b"\xc3\xa9", b"x", b"yz"]], dtype=np.object_)
    t = th.InferInput("in_BYTES", [2, 3], "BYTES")
    t.set_data_from_numpy(s, binary_data=binary)
    inputs.append(t)
    want["out_BYTES"] = s
    if not binary:
        # identity needs every input; FP16 travels binary alongside the JSON ones.
        t = th.InferInput("in_FP16", [2, 3], "FP16")
        t.set_data_from_numpy(np.ones((2, 3), np.float16), binary_data=True)
        inputs.append(t)
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in want]
    result = client.infer("identity", inputs, outputs=outputs, headers=h)
    for name, arr in want.items():
        got = result.as_numpy(name)
        assert got is not None and got.shape == arr.shape, name
        if name == "out_BYTES":
            assert [
                bytes(x) if isinstance(x, bytes) else str(x).encode() for x in got.reshape(-1)
            ] == list(arr.reshape(-1))
        else:
            np.testing.assert_array_equal(got, arr, err_msg=name)
    client.close()


def test_tritonclient_http_errors_are_clear(rest_server: Any) -> None:
    rest = rest_server()
    client = th.InferenceServerClient(rest.target)
    x = th.InferInput("input", [1, 5], "FP32")
    x.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected shape \[-1, 64\], got \[1, 5\]"):
        client.infer("digits", [x], headers=rest.headers())
    with pytest.raises(InferenceServerException, match="missing credentials"):
        client.infer("digits", [x])
    with pytest.raises(InferenceServerException, match=r"\[404\] model 'nope' is not served"):
        client.get_model_metadata("nope", headers=rest.headers())
    ok = th.InferInput("input", [1, 64], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 64), np.float32))
    assert client.infer("digits", [ok], headers=rest.headers()).as_numpy("label").shape == (1,)


def test_kserve_rest_wire_format(rest_server: Any) -> None:
    """The requests KServe's InferenceRESTClient (protocol v2) sends, as its docs show."""
    rest = rest_server()
    base = f"http://{rest.target}"
    with httpx.Client(base_url=base, headers=rest.headers(), timeout=10) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/models/digits/ready").status_code == 200
        meta = http.get("/v2/models/digits").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["versions"] == ["1"]
        body = {
            "id": "req-7",
            "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                        "data": [[0.0] * 64, [1.0] * 64]}],
        }  # fmt: skip
        r = http.post("/v2/models/digits/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        doc = r.json()
        assert doc["id"] == "req-7" and doc["model_name"] == "digits"
        outs = {o["name"]: o for o in doc["outputs"]}
        assert outs["probabilities"]["shape"] == [2, 10]
        assert len(outs["probabilities"]["data"]) == 20
        assert outs["label"]["datatype"] == "INT64"
        # The versioned route, and one output asked for by name.
        body["outputs"] = [{"name": "label"}]
        r = http.post("/v2/models/digits/versions/1/infer", json=body)
        assert [o["name"] for o in r.json()["outputs"]] == ["label"]
        r = http.post("/v2/models/digits/versions/9/infer", json=body)
        assert r.status_code == 404 and "version" in r.json()["error"]


def test_accepted_connections_send_without_nagle_delay(rest_server: Any) -> None:
    """Responses go out as two writes (head, body): without TCP_NODELAY the second waits
    for the client's delayed ACK (40 ms a request)."""
    import socket

    rest = rest_server()
    with httpx.Client(base_url=f"http://{rest.target}", headers=rest.headers(), timeout=10) as h:
        assert h.get("/v2/health/live").status_code == 200  # the connection stays open
        conns = list(rest.running.server.rest._server.server_state.connections)
        assert conns
        for conn in conns:
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
