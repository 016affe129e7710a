"""Verify, then trust: the SDK against a server on the simulated platform."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.client import AsyncClient, Client
from sealserve.errors import PolicyError, VerificationError
from sealserve.server.grpc.attestation_service import AttestationServicer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # UnsafeAllowSimulated warns

X = {"input": np.zeros((1, 64), np.float32)}
DEV_POLICY = "version = 1\nunsafe_allow_simulated = true\n"


@pytest.fixture
def sim_server(start_server: Any, repo: Path, sim_root: Path) -> Any:
    def _start(**kw: Any) -> Any:
        return start_server(
            model_repository=repo,
            attestation_platform="simulated",
            simulated_platform_dir=sim_root,
            **kw,
        )

    return _start


def _roots(sim_root: Path) -> TrustedRoots:
    return TrustedRoots.amd() + TrustedRoots.from_dir(sim_root)


def _infer_count(running: Any) -> float:
    total = 0.0
    for metric in running.server.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


def test_attested_client_infers(sim_server: Any, sim_root: Path) -> None:
    running = sim_server()
    policy = policy_from_toml(DEV_POLICY)
    with Client(running.target, policy=policy, roots=_roots(sim_root)) as c:
        assert c.attestation is not None
        assert c.attestation.claims.simulated
        assert c.attestation.claims.manifest_digest == running.server.manifest.digest()
        assert c.infer("digits", X)["probabilities"].shape == (1, 10)


async def test_async_client_attests_on_first_call(sim_server: Any, sim_root: Path) -> None:
    running = sim_server()
    async with AsyncClient(
        running.target, policy=policy_from_toml(DEV_POLICY), roots=_roots(sim_root)
    ) as c:
        out = await c.infer("digits", X)
        assert out["label"].shape == (1,)
        assert c.attestation is not None and c.attestation.claims.simulated


def test_default_policy_refuses_simulated_and_sends_nothing(
    sim_server: Any, sim_root: Path
) -> None:
    running = sim_server()
    with pytest.raises(VerificationError) as info:
        Client(running.target)  # default: AMD roots, default policy
    assert info.value.check == "trusted_root"
    with pytest.raises(PolicyError, match="SIMULATED|simulated"):
        Client(running.target, roots=_roots(sim_root))  # roots trusted, policy still refuses
    assert _infer_count(running) == 0


def test_refuses_tls_key_not_bound(
    sim_server: Any, sim_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealserve.enclave.tls import TlsIdentity

    other = TlsIdentity.generate().spki_der
    running = sim_server()
    servicer_cls = AttestationServicer
    original = servicer_cls.evidence

    def lying(self: AttestationServicer, nonce: bytes) -> bytes:
        self._tls_spki = other  # evidence binds a key the server does not use
        return original(self, nonce)

    monkeypatch.setattr(servicer_cls, "evidence", lying)
    with pytest.raises(VerificationError) as info:
        Client(running.target, policy=policy_from_toml(DEV_POLICY), roots=_roots(sim_root))
    assert info.value.check == "tls_binding"
    assert "not the key bound" in info.value.message
    assert _infer_count(running) == 0


def test_refuses_debug_guest(
    sim_server: Any, sim_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealserve.enclave.simulated import SimulatedPlatform
    from sealserve.server import app

    monkeypatch.setattr(
        app, "select_platform", lambda s, code: SimulatedPlatform(sim_root, debug=True)
    )
    running = sim_server()
    with pytest.raises(PolicyError, match="DEBUG"):
        Client(running.target, policy=policy_from_toml(DEV_POLICY), roots=_roots(sim_root))
    assert _infer_count(running) == 0


def test_refuses_manifest_not_allowed(sim_server: Any, sim_root: Path) -> None:
    running = sim_server()
    policy = policy_from_toml(DEV_POLICY + f'manifest_digests = ["{"00" * 32}"]\n')
    with pytest.raises(PolicyError, match="manifest"):
        Client(running.target, policy=policy, roots=_roots(sim_root))
    good = policy_from_toml(
        DEV_POLICY + f'manifest_digests = ["{running.server.manifest.digest().hex()}"]\n'
    )
    with Client(running.target, policy=good, roots=_roots(sim_root)) as c:
        assert c.infer("digits", X)["label"].shape == (1,)


def test_refuses_evidence_for_an_old_nonce(
    sim_server: Any, sim_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = sim_server()
    original = AttestationServicer.evidence
    first: list[bytes] = []

    def replaying(self: AttestationServicer, nonce: bytes) -> bytes:
        if not first:
            first.append(original(self, nonce))
        return first[0]  # always the evidence made for the first nonce

    monkeypatch.setattr(AttestationServicer, "evidence", replaying)
    policy = policy_from_toml(DEV_POLICY)
    Client(running.target, policy=policy, roots=_roots(sim_root)).close()
    with pytest.raises(VerificationError) as info:
        Client(running.target, policy=policy, roots=_roots(sim_root))
    assert info.value.check == "nonce"


def test_short_nonce_is_invalid_argument(sim_server: Any) -> None:
    import grpc

    from sealserve._proto import attestation_pb2 as apb
    from sealserve._proto import attestation_pb2_grpc
    from sealserve.client.attested import fetch_certificate, pinned_channel

    running = sim_server()
    with pinned_channel(running.target, fetch_certificate(running.target)) as ch:
        stub = attestation_pb2_grpc.AttestationStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetEvidence(apb.GetEvidenceRequest(nonce=b"short"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nonce" in info.value.details()


def test_unsafe_policy_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from sealserve.attestation.policy import UnsafeAllowSimulated

        with pytest.raises(PolicyError):
            UnsafeAllowSimulated().verify(_fake_claims())
    assert caught


def _fake_claims() -> Any:
    from sealserve.attestation.claims import Claims, Platform

    return Claims(Platform.SEV_SNP, bytes(64), False, {}, {})
