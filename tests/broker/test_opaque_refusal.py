"""One opaque refusal: whatever fails, the caller sees the same status and message,
for an existing key id as for an unknown one; the reason is in the broker's log only."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealserve._proto import broker_pb2 as bpb
from sealserve._proto import broker_pb2_grpc
from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp_certs import ARK_GUID, ASK_GUID, VCEK_GUID, CertTable
from sealserve.enclave.key_release import hpke_public_bytes
from sealserve.enclave.model_file import generate_key
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform
from tests.broker.conftest import PINNED_POLICY, Running

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]

REFUSED = (grpc.StatusCode.PERMISSION_DENIED, "key release refused")
TDX_QUOTE = Path(__file__).resolve().parent.parent / "data/vectors/tdx/trustee/tdx_quote_4.dat"


def _refused(stub: Any, key_id: str, evidence: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ReleaseKey(bpb.ReleaseKeyRequest(key_id=key_id, evidence=evidence), timeout=10)
    return info.value.code(), info.value.details()


def _tampered(stub: Any, platform: SimulatedPlatform, hpke: X25519PrivateKey) -> dict[str, Any]:
    """Evidence broken in each way an operator could break it, fresh nonce each."""

    def fresh() -> Evidence:
        nonce = bytes(stub.GetChallenge(bpb.GetChallengeRequest(), timeout=10).nonce)
        return attest(platform, nonce=nonce, tls_spki=b"spki", manifest=b"{}",
                      hpke_public_key=hpke_public_bytes(hpke))  # fmt: skip

    def with_certs(certs: bytes) -> Callable[[], bytes]:
        def make() -> bytes:
            return dataclasses.replace(fresh(), certs=certs).to_bytes()

        return make

    def tdx_quote() -> bytes:  # a genuine TD's quote (another workload) for our nonce
        ev = fresh()
        return dataclasses.replace(
            ev, platform=Platform.TDX, report=TDX_QUOTE.read_bytes(), certs=b""
        ).to_bytes()

    def truncated() -> bytes:
        ev = fresh()
        return dataclasses.replace(ev, report=ev.report[:100]).to_bytes()

    garbage_cert = b"\x30\x82\x01\x00" + b"\xff" * 40
    return {
        "malformed_vcek": with_certs(CertTable.build({VCEK_GUID: garbage_cert}).to_bytes()),
        "vcek_not_der": with_certs(CertTable.build({VCEK_GUID: b"not a certificate"}).to_bytes()),
        "garbage_chain": with_certs(
            CertTable.build(
                {ARK_GUID: garbage_cert, ASK_GUID: garbage_cert, VCEK_GUID: garbage_cert}
            ).to_bytes()
        ),
        "cert_table_junk": with_certs(b"\x01" * 77),
        "truncated_report": truncated,
        "other_tdx_workload": tdx_quote,
        "not_evidence": lambda: b"SSEV\x02" + b"\x00" * 20,
    }


def test_every_refusal_is_the_same_for_existing_and_unknown_key_ids(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey, caplog: Any
) -> None:
    running = start_broker()
    running.broker.add_key("real", generate_key(), policy_toml=PINNED_POLICY,
                           roots=("unsafe-simulated",), actor="test")  # fmt: skip
    channel = grpc.secure_channel(
        running.target, grpc.ssl_channel_credentials(root_certificates=running.ca_pem)
    )
    stub = broker_pb2_grpc.KeyBrokerStub(channel)
    outcomes: dict[tuple[str, str], tuple[grpc.StatusCode, str]] = {}
    with channel, caplog.at_level(logging.INFO, logger="sealserve.broker"):
        cases = _tampered(stub, SimulatedPlatform(sim_root), hpke_key)
        for name, make in cases.items():
            for key_id in ("real", "no-such-key", "x" * 300):
                outcomes[(name, key_id[:20])] = _refused(stub, key_id, make())
    assert len(outcomes) == 21
    assert set(outcomes.values()) == {REFUSED}, {k: v for k, v in outcomes.items() if v != REFUSED}
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "key_release_refused"]
    assert len(refusals) == 21
    # The log names the failing check; none of them is "the key id is unknown", because
    # the evidence is verified before the key id is looked at.
    checks = {r.check for r in refusals}
    assert "unknown_key" not in checks
    # Each broken evidence fails the same check for the existing and the unknown ids.
    by_case = [{r.check for r in refusals[i : i + 3]} for i in range(0, 21, 3)]
    assert all(len(case) == 1 for case in by_case), by_case
    # The TD's quote came without collateral: refused for that (the broker always
    # evaluates TDX collateral), still before any key id is looked at.
    assert by_case[list(cases).index("other_tdx_workload")] == {"collateral"}
    assert all(r.reason for r in refusals)


def test_an_unexpected_error_in_verification_is_the_same_refusal(
    start_broker: Callable[..., Running],
    sim_root: Path,
    hpke_key: X25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    import sealserve.broker.core as core
    from sealserve.errors import KeyReleaseError

    running = start_broker()
    running.broker.add_key("real", generate_key(), policy_toml=PINNED_POLICY,
                           roots=("unsafe-simulated",), actor="test")  # fmt: skip

    def boom(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a parser bug deep in the chain check")

    monkeypatch.setattr(core, "verify_evidence_at_time", boom)
    messages = []
    with caplog.at_level(logging.INFO, logger="sealserve.broker"):
        for key_id in ("real", "no-such-key"):
            nonce = running.broker.challenge()
            ev = attest(SimulatedPlatform(sim_root), nonce=nonce, tls_spki=b"s", manifest=b"{}",
                        hpke_public_key=hpke_public_bytes(hpke_key))  # fmt: skip
            with pytest.raises(KeyReleaseError) as info:
                running.broker.release(key_id, ev.to_bytes())
            messages.append(info.value.message)
    assert messages == ["key release refused"] * 2
    refusals = [r for r in caplog.records if getattr(r, "event", "") == "key_release_refused"]
    assert [r.check for r in refusals] == ["internal", "internal"]
    assert "a parser bug" in refusals[0].reason
