"""The REST port's TLS is the gRPC port's in-memory identity, so one attestation covers
both; the SDK's ``protocol="http"`` verifies, then trusts; proof of work, quota
headers and metrics carry over; curl works against a running server with auth on."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.client import Client
from sealserve.client.rest import pinned_context
from sealserve.errors import (
    ChallengeRequiredError,
    InputError,
    PolicyError,
    RateLimitedError,
    SuspendedError,
    VerificationError,
)
from tests.conftest import sealserve_cmd, sealserve_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # UnsafeAllowSimulated warns

X = {"input": np.zeros((1, 64), np.float32)}
DEV_POLICY = policy_from_toml("version = 1\nunsafe_allow_simulated = true\n")


def _roots(sim_root: Path) -> TrustedRoots:
    return TrustedRoots.amd() + TrustedRoots.from_dir(sim_root)


def _samples(running: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for metric in running.server.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_same_certificate_on_both_ports_and_attested_http_client(
    rest_server: Any, sim_root: Path
) -> None:
    rest = rest_server(
        unsafe_plaintext=False, attestation_platform="simulated", simulated_platform_dir=sim_root
    )
    grpc_cert = ssl.get_server_certificate(("127.0.0.1", rest.running.port))
    rest_cert = ssl.get_server_certificate(("127.0.0.1", rest.port))
    assert grpc_cert == rest_cert
    with Client(rest.target, protocol="http", policy=DEV_POLICY, roots=_roots(sim_root),
                token=rest.token()) as c:  # fmt: skip
        assert c.attestation is not None and c.attestation.claims.simulated
        assert c.attestation.certificate_pem.decode() == rest_cert
        assert c.attestation.claims.manifest_digest == rest.running.server.manifest.digest()
        out = c.infer("digits", X)
        assert out["probabilities"].shape == (1, 10) and out["label"].dtype == np.int64
        assert c.server_ready() and c.model_ready("digits")
        assert c.model_metadata("digits")["outputs"][0]["name"] == "label"
        with pytest.raises(InputError, match=r"expected shape \[-1, 64\], got \[1, 3\]"):
            c.infer("digits", {"input": np.zeros((1, 3), np.float32)})
    # Nothing reached inference before the client verified: the default policy refuses
    # the simulated platform, and the evidence route asked no token.
    before = _samples(rest.running, "sealserve_requests_total")
    with pytest.raises(VerificationError):
        Client(rest.target, protocol="http")
    with pytest.raises(PolicyError):
        Client(rest.target, protocol="http", roots=_roots(sim_root))
    assert _samples(rest.running, "sealserve_requests_total") == before
    # The evidence route is public and names a bad nonce short.
    pinned = pinned_context(rest_cert.encode())
    r = httpx.get(f"https://{rest.target}/v2/sealserve/evidence?nonce=zz", verify=pinned)
    assert r.status_code == 400 and "not hexadecimal" in r.json()["error"]


def test_metrics_name_the_protocol(rest_server: Any) -> None:
    rest = rest_server()
    with Client(rest.target, protocol="http", unsafe_plaintext=True, token=rest.token()) as c:
        for _ in range(2):
            c.infer("digits", X)
        with pytest.raises(InputError):
            c.infer("digits", {"input": np.zeros((1, 3), np.float32)})
    with Client(rest.running.target, unsafe_plaintext=True, token=rest.token()) as g:
        g.infer("digits", X)
    got = _samples(rest.running, "sealserve_requests_total")
    key = lambda code, proto: (("code", code), ("model", "digits"), ("protocol", proto),  # noqa: E731
                               ("version", "1"))  # fmt: skip
    assert got[key("200", "rest")] == 2
    assert got[key("400", "rest")] == 1
    assert got[key("OK", "grpc")] == 1
    latency = _samples(rest.running, "sealserve_request_latency_seconds_count")
    assert latency[(("model", "digits"), ("protocol", "rest"), ("version", "1"))] == 2


def test_quota_headers_and_proof_of_work(rest_server: Any) -> None:
    rest = rest_server(
        state_store="memory:",
        limits={"tiers": {"standard": {"rate": 100, "burst": 100, "per_day": 5}}},
    )
    with Client(rest.target, protocol="http", unsafe_plaintext=True,
                token=rest.token("payer")) as c:  # fmt: skip
        c.infer("digits", X)
        assert c.quota is not None and c.quota.windows["account.day"] == (4, 5)
        assert isinstance(c.quota_remaining, int) and c.quota_remaining <= 4
        rest.running.server.plane.guard.quota.challenge(
            "payer", 6, reason="test", set_by="operator"
        )
        c.infer("digits", X)  # pays the proof of work and retries once
    url = f"http://{rest.target}/v2/models/digits/infer"
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}  # fmt: skip
    r = httpx.post(url, json=body, headers=rest.headers("payer"), timeout=10)
    assert r.status_code == 428 and r.headers["sealserve-challenge"].startswith("pow1.")
    with Client(rest.target, protocol="http", unsafe_plaintext=True, token=rest.token("payer"),
                solve_challenges=False) as c:  # fmt: skip
        with pytest.raises(ChallengeRequiredError) as info:
            c.infer("digits", X)
        assert info.value.challenge.startswith("pow1.")
    with Client(rest.target, protocol="http", unsafe_plaintext=True,
                token=rest.token("spender")) as c:  # fmt: skip
        for _ in range(5):
            c.infer("digits", X)
        with pytest.raises(RateLimitedError) as limited:
            c.infer("digits", X)
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1
    r = httpx.post(url, json=body, headers=rest.headers("spender"), timeout=10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # A suspended account: 403 for any client, SuspendedError in the SDK.
    rest.running.server.plane.guard.quota.suspend("thief", reason="test", set_by="operator")
    with Client(rest.target, protocol="http", unsafe_plaintext=True,
                token=rest.token("thief")) as c:  # fmt: skip
        with pytest.raises(SuspendedError, match="account is suspended"):
            c.infer("digits", X)
    r = httpx.post(url, json=body, headers=rest.headers("thief"), timeout=10)
    assert r.status_code == 403 and r.headers["sealserve-refusal"] == "suspended"


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl missing (scripts/_env.sh installs it)"
)
def test_curl_against_sealserve_serve_with_auth(tmp_path: Path, auth_config: Any) -> None:
    from sealserve import demo

    issuer, auth = auth_config
    cfg = tmp_path / "sealserve.toml"
    issuers = auth["issuers"][0]
    cfg.write_text(
        f'model_repository = "{demo.repository()}"\nport = 0\nlog_format = "text"\n'
        "harden_process = false\n"
        f'[auth]\naudience = "{auth["audience"]}"\n'
        f'required_tos_version = "{auth["required_tos_version"]}"\n'
        f'[[auth.issuers]]\nissuer = "{issuers["issuer"]}"\njwks_file = "{issuers["jwks_file"]}"\n'
        "[rest]\nport = 0\n"
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("serve", "--config", str(cfg), "--ready-file", str(ready)),
        env=sealserve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"sealserve serve did not start:\n{out}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        cert = tmp_path / "server.pem"  # the public certificate only
        cert.write_text(info["tls_cert_pem"])
        base = f"https://localhost:{info['rest_port']}"
        token = issuer.issue("curl-user", tier="standard", scopes=["infer"],
                             tos_version=auth["required_tos_version"], ttl=600)  # fmt: skip
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": [0.0] * 64}]})  # fmt: skip

        def curl(*args: str) -> tuple[int, str]:
            out = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--cacert", str(cert),
                 "-w", "\n%{http_code}", *args],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout  # fmt: skip
            text, _, code = out.rpartition("\n")
            return int(code), text

        code, text = curl(f"{base}/v2/models/digits/infer", "-H", f"Authorization: Bearer {token}",
                          "-H", "Content-Type: application/json", "--data-binary", body)  # fmt: skip
        assert code == 200, text
        outputs = {o["name"]: o for o in json.loads(text)["outputs"]}
        assert outputs["probabilities"]["shape"] == [1, 10]
        code, text = curl(f"{base}/v2/models/digits/infer", "--data-binary", body)
        assert code == 401 and "missing credentials" in json.loads(text)["error"]
        code, text = curl(f"{base}/v2/models/digits/infer", "-H", f"Authorization: Bearer {token}",
                          "--data-binary", "{not json")  # fmt: skip
        assert code == 400 and "not valid JSON" in json.loads(text)["error"]
    finally:
        proc.terminate()
        proc.wait(15)


def test_http_client_reconnects_after_the_server_closes_an_idle_connection(
    rest_server: Any,
) -> None:
    rest = rest_server(rest={"keep_alive_s": 1})
    with Client(rest.target, protocol="http", unsafe_plaintext=True, token=rest.token()) as c:
        c.infer("digits", X)
        time.sleep(1.6)  # the server closes the idle keep-alive connection
        assert c.infer("digits", X)["label"].shape == (1,)


def test_rest_evidence_shares_the_per_peer_evidence_rate(rest_server: Any, sim_root: Path) -> None:
    """The REST evidence route is no side door around GetEvidence's per-address rate."""
    rest = rest_server(
        unsafe_plaintext=False,
        attestation_platform="simulated",
        simulated_platform_dir=sim_root,
        evidence_per_peer_per_minute=3,
    )
    url = f"https://127.0.0.1:{rest.port}/v2/sealserve/evidence?nonce={'ab' * 32}"
    with httpx.Client(verify=False, timeout=30) as http:  # noqa: S501 - evidence is public
        codes = [http.get(url).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200]
    assert codes[3] == 429
