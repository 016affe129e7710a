"""KServe's own REST client (``kserve.InferenceRESTClient``, protocol v2) against the
REST port with auth on: health, readiness, JSON and binary-extension inference, the
errors it raises, and the same client over TLS pinned to the certificate both ports
present (the one the attestation covers). The client runs in its own interpreter
(_kserve_session.py): the kserve package registers OIP protobuf names that clash with
tritonclient's and sealserve's."""

from __future__ import annotations

import importlib.util
import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("kserve") is None:  # not imported here: see the docstring
    pytest.skip("the kserve package is not installed", allow_module_level=True)

SESSION = Path(__file__).with_name("_kserve_session.py")
X = np.linspace(0, 16, 2 * 64, dtype=np.float32).reshape(2, 64)


def _session(job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(SESSION)], input=json.dumps({"x": X.tolist(), **job}),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_kserve_rest_client_health_inference_and_errors(rest_server: Any) -> None:
    rest = rest_server()
    errors = [
        ["digits", [1, 5], rest.headers()],  # wrong shape
        ["digits", [1, 64], {}],  # no token
        ["nope", [1, 64], rest.headers()],  # unknown model
        ["digits", [1, 64], rest.headers(scopes=("metadata",))],  # no infer scope
    ]
    got = _session({"base": f"http://{rest.target}", "token": rest.token(), "errors": errors})
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    model = rest.running.server.engine.resolve("digits")
    want = dict(zip(model.output_names, model.run({"input": X}), strict=True))
    for binary in (False, True):
        res = got[f"infer_{binary}"]
        assert res["id"] == f"r-{binary}" and res["model_name"] == "digits"
        np.testing.assert_allclose(res["probabilities"], want["probabilities"], rtol=1e-6)
        np.testing.assert_array_equal(res["label"], want["label"])
    codes = [e[0] for e in got["errors"]]
    texts = [json.loads(e[1])["error"] for e in got["errors"]]
    assert codes == [400, 401, 404, 403]
    assert "expected shape [-1, 64], got [1, 5]" in texts[0]
    assert "credentials" in texts[1]
    assert "model 'nope' is not served" in texts[2]
    for _, text in got["errors"]:  # short, opaque messages: no traceback
        assert "Traceback" not in text and len(text) < 400


def test_kserve_rest_client_over_tls_pinned_to_the_attested_certificate(
    rest_server: Any, sim_root: Any
) -> None:
    rest = rest_server(
        unsafe_plaintext=False, attestation_platform="simulated", simulated_platform_dir=sim_root
    )
    pem = ssl.get_server_certificate(("127.0.0.1", rest.running.port))  # the gRPC port's
    base = f"https://{rest.target}"
    got = _session({"base": base, "token": rest.token(), "cadata": pem})
    assert got["ready"] is True
    assert np.asarray(got["infer_True"]["label"]).shape == (2,)
    # A client that trusts only the system's roots does not get through.
    assert _session({"base": base, "token": rest.token(), "system_roots": True}) == {
        "connect_error": "ConnectError"
    }
