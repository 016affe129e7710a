"""KServe's own REST client (``kserve.InferenceRESTClient``, protocol v2) against the
REST port with auth on: health, readiness, JSON and binary-extension inference, the
errors it raises, and the same client over TLS pinned to the certificate both ports
present (the one the attestation covers)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
import numpy as np
import pytest

kserve = pytest.importorskip("kserve")
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig  # noqa: E402

X = np.linspace(0, 16, 2 * 64, dtype=np.float32).reshape(2, 64)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _session(rest: Any, *, base: str, verify: Any = False) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", verify=verify, timeout=30, retries=0))
    h = rest.headers()
    try:
        got: dict[str, Any] = {
            "live": await client.is_server_live(base, headers=h),
            "ready": await client.is_server_ready(base, headers=h),
            "model_ready": await client.is_model_ready(base, "digits", headers=h),
        }
        for binary in (False, True):
            x = InferInput("input", list(X.shape), "FP32")
            x.set_data_from_numpy(X, binary_data=binary)
            req = InferRequest(model_name="digits", infer_inputs=[x], request_id=f"r-{binary}")
            res = await client.infer(base, req, model_name="digits", headers=dict(h))
            got[f"infer_{binary}"] = res
        return got
    finally:
        await client.close()


def test_kserve_rest_client_health_and_inference(rest_server: Any) -> None:
    rest = rest_server()
    got = _run(_session(rest, base=f"http://{rest.target}"))
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    model = rest.running.server.engine.resolve("digits")
    want = dict(zip(model.output_names, model.run({"input": X}), strict=True))
    for binary in (False, True):
        res = got[f"infer_{binary}"]
        assert res.id == f"r-{binary}" and res.model_name == "digits"
        probs = res.get_output_by_name("probabilities").as_numpy()
        label = res.get_output_by_name("label").as_numpy()
        assert probs.shape == (2, 10) and label.shape == (2,)
        np.testing.assert_allclose(probs, want["probabilities"], rtol=1e-6)
        np.testing.assert_array_equal(label, want["label"])


def test_kserve_rest_client_errors(rest_server: Any) -> None:
    rest = rest_server()
    base = f"http://{rest.target}"

    async def calls() -> list[httpx.HTTPStatusError]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30, retries=0))
        errors = []
        bad = InferInput("input", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), np.float32), binary_data=False)
        ok = InferInput("input", [1, 64], "FP32")
        ok.set_data_from_numpy(np.zeros((1, 64), np.float32), binary_data=False)
        attempts = [
            ("digits", InferRequest("digits", [bad]), rest.headers()),
            ("digits", InferRequest("digits", [ok]), {}),  # no token
            ("nope", InferRequest("nope", [ok]), rest.headers()),
            ("digits", InferRequest("digits", [ok]), rest.headers(scopes=("metadata",))),
        ]
        try:
            for model, req, headers in attempts:
                with pytest.raises(httpx.HTTPStatusError) as info:
                    await client.infer(base, req, model_name=model, headers=headers)
                errors.append(info.value)
        finally:
            await client.close()
        return errors

    errors = _run(calls())
    assert [e.response.status_code for e in errors] == [400, 401, 404, 403]
    assert "expected shape [-1, 64], got [1, 5]" in errors[0].response.json()["error"]
    assert "credentials" in errors[1].response.json()["error"]
    assert "model 'nope' is not served" in errors[2].response.json()["error"]
    for e in errors:  # short, opaque messages: no traceback
        assert "Traceback" not in e.response.text and len(e.response.text) < 400


def test_kserve_rest_client_over_tls_pinned_to_the_attested_certificate(
    rest_server: Any, sim_root: Any
) -> None:
    rest = rest_server(
        unsafe_plaintext=False, attestation_platform="simulated", simulated_platform_dir=sim_root
    )
    pem = ssl.get_server_certificate(("127.0.0.1", rest.running.port))  # the gRPC port's
    pinned = ssl.create_default_context(cadata=pem)
    got = _run(_session(rest, base=f"https://{rest.target}", verify=pinned))
    assert got["ready"] is True
    assert got["infer_True"].get_output_by_name("label").as_numpy().shape == (2,)
    # A client that trusts another certificate does not get through.
    other = ssl.create_default_context()
    with pytest.raises(httpx.ConnectError):
        _run(_session(rest, base=f"https://{rest.target}", verify=other))
