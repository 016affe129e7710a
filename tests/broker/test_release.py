"""Key release over gRPC on loopback: who gets a key and who is refused (and how)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealserve._proto import broker_pb2 as bpb
from sealserve._proto import broker_pb2_grpc
from sealserve.attestation.evidence import Evidence
from sealserve.enclave.key_release import fetch_model_key, hpke_public_bytes
from sealserve.enclave.key_wrap import SealedKey, open_data_key
from sealserve.enclave.model_file import decrypt_to_bytes, encrypt_stream, generate_key
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import KeyReleaseError
from tests.broker.conftest import AMD_POLICY, PINNED_POLICY, SIM_POLICY, Running

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]

TLS_SPKI = b"spki-of-the-server"
MANIFEST = b'{"models": []}'
REFUSED = "key release refused"


def _stub(running: Running) -> Any:
    channel = grpc.secure_channel(
        running.target, grpc.ssl_channel_credentials(root_certificates=running.ca_pem)
    )
    return channel, broker_pb2_grpc.KeyBrokerStub(channel)


def _evidence(stub: Any, platform: SimulatedPlatform, hpke: X25519PrivateKey) -> Evidence:
    nonce = bytes(stub.GetChallenge(bpb.GetChallengeRequest(), timeout=10).nonce)
    return attest(
        platform,
        nonce=nonce,
        tls_spki=TLS_SPKI,
        manifest=MANIFEST,
        hpke_public_key=hpke_public_bytes(hpke),
    )


def _release(stub: Any, key_id: str, evidence: bytes) -> Any:
    return stub.ReleaseKey(bpb.ReleaseKeyRequest(key_id=key_id, evidence=evidence), timeout=10)


def _refusal(stub: Any, key_id: str, evidence: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _release(stub, key_id, evidence)
    return info.value.code(), info.value.details()


def _fetch(
    running: Running, platform: SimulatedPlatform, hpke: X25519PrivateKey, key_id: str
) -> bytes:
    return fetch_model_key(
        running.target,
        key_id=key_id,
        platform=platform,
        tls_spki=TLS_SPKI,
        manifest=MANIFEST,
        hpke_private_key=hpke,
        broker_ca_pem=running.ca_pem,
        timeout=10,
    )


def test_release_to_evidence_that_meets_the_policy_and_decrypt_the_model(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey, caplog: Any
) -> None:
    running = start_broker()
    data_key = generate_key()
    with running.admin() as admin:
        admin.add_key("model-a", data_key, policy_toml=PINNED_POLICY, roots=["unsafe-simulated"])
    model = b"onnx model bytes " * 5000
    sealed_model = io.BytesIO()
    encrypt_stream(io.BytesIO(model), sealed_model, key=data_key, key_id="model-a", chunk_size=4096)

    with caplog.at_level(logging.INFO, logger="sealserve.broker"):
        released = _fetch(running, SimulatedPlatform(sim_root), hpke_key, "model-a")

    assert released == data_key
    sealed_model.seek(0)
    assert decrypt_to_bytes(sealed_model, key=released) == model
    records = [r for r in caplog.records if getattr(r, "event", "") == "key_released"]
    assert len(records) == 1 and records[0].key_id == "model-a"
    assert data_key.hex() not in caplog.text


def test_refusals_are_identical_to_the_client_and_named_in_the_log(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey, caplog: Any
) -> None:
    running = start_broker()
    with running.admin() as admin:
        admin.add_key(
            "pinned", generate_key(), policy_toml=PINNED_POLICY, roots=["unsafe-simulated"]
        )
        admin.add_key("nopolicy", generate_key(), roots=["unsafe-simulated"])
        admin.add_key("amd-only", generate_key(), policy_toml=AMD_POLICY, roots=["amd"])
        admin.add_key("revoked", generate_key(), policy_toml=SIM_POLICY, roots=["unsafe-simulated"])
        admin.revoke_key("revoked")
    good = SimulatedPlatform(sim_root)
    other_measurement = SimulatedPlatform(sim_root, measurement=b"\x42" * 48)
    debug = SimulatedPlatform(sim_root, debug=True)
    channel, stub = _stub(running)
    outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
    with channel, caplog.at_level(logging.INFO, logger="sealserve.broker"):
        ev = _evidence(stub, other_measurement, hpke_key)
        outcomes["measurement"] = _refusal(stub, "pinned", ev.to_bytes())
        ev = _evidence(stub, debug, hpke_key)
        outcomes["debug"] = _refusal(stub, "pinned", ev.to_bytes())
        # Replay: the first use succeeds, the second is refused.
        ev = _evidence(stub, good, hpke_key)
        _release(stub, "pinned", ev.to_bytes())
        outcomes["replay"] = _refusal(stub, "pinned", ev.to_bytes())
        # Expired: the broker's nonce clock moves past the ttl.
        ev = _evidence(stub, good, hpke_key)
        running.nonce_clock.now += 61
        outcomes["expired"] = _refusal(stub, "pinned", ev.to_bytes())
        ev = _evidence(stub, good, hpke_key)
        outcomes["unknown"] = _refusal(stub, "no-such-key", ev.to_bytes())
        # Evidence made for one HPKE key, presented with another (binding breaks).
        ev = _evidence(stub, good, hpke_key)
        swapped = Evidence(
            platform=ev.platform,
            report=ev.report,
            certs=ev.certs,
            manifest=ev.manifest,
            tls_spki=ev.tls_spki,
            hpke_public_key=hpke_public_bytes(X25519PrivateKey.generate()),
            nonce=ev.nonce,
        )
        outcomes["binding"] = _refusal(stub, "pinned", swapped.to_bytes())
        ev = _evidence(stub, good, hpke_key)
        outcomes["no_policy"] = _refusal(stub, "nopolicy", ev.to_bytes())
        ev = _evidence(stub, good, hpke_key)
        outcomes["amd_only"] = _refusal(stub, "amd-only", ev.to_bytes())
        ev = _evidence(stub, good, hpke_key)
        outcomes["revoked"] = _refusal(stub, "revoked", ev.to_bytes())
        outcomes["garbage"] = _refusal(stub, "pinned", b"not evidence")

    assert set(outcomes.values()) == {(grpc.StatusCode.PERMISSION_DENIED, REFUSED)}
    reasons = [
        (r.check, r.reason)
        for r in caplog.records
        if getattr(r, "event", "") == "key_release_refused"
    ]
    expected = [  # (check, words of the reason), in the order of the calls above
        ("PolicyError", f"measurement {'42' * 48} is not in the allowed list"),
        ("PolicyError", "DEBUG policy bit is set"),
        ("nonce_unknown_or_replayed", "already used"),
        ("nonce_expired", "nonce expired"),
        ("unknown_key", "unknown key id 'no-such-key'"),
        ("report_data_binding", "REPORT_DATA does not bind"),
        ("no_policy", "no release policy (default deny)"),
        ("trusted_root", "chains to the 'unsafe-simulated' root, which this key does not"),
        ("revoked_key", "key id 'revoked' is revoked"),
        ("evidence", "wrong magic"),
    ]
    assert [c for c, _ in reasons] == [c for c, _ in expected]
    for (_, reason), (_, words) in zip(reasons, expected, strict=True):
        assert words in reason


def test_fetch_model_key_raises_key_release_error_on_refusal(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey
) -> None:
    running = start_broker()
    with running.admin() as admin:
        admin.add_key(
            "pinned", generate_key(), policy_toml=PINNED_POLICY, roots=["unsafe-simulated"]
        )
    with pytest.raises(KeyReleaseError) as info:
        _fetch(running, SimulatedPlatform(sim_root, debug=True), hpke_key, "pinned")
    assert info.value.message.endswith(f"refused to release key 'pinned': {REFUSED}")


def test_sealed_key_opens_only_for_its_key_id_nonce_and_private_key(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey
) -> None:
    running = start_broker()
    data_key = generate_key()
    with running.admin() as admin:
        admin.add_key("k", data_key, policy_toml=SIM_POLICY, roots=["unsafe-simulated"])
    channel, stub = _stub(running)
    with channel:
        ev = _evidence(stub, SimulatedPlatform(sim_root), hpke_key)
        r = _release(stub, "k", ev.to_bytes())
    sealed = SealedKey(r.enc, r.ciphertext, r.kem_id, r.kdf_id, r.aead_id)
    assert (r.kem_id, r.kdf_id, r.aead_id) == (0x20, 0x1, 0x2)
    assert open_data_key(sealed, private_key=hpke_key, key_id="k", nonce=ev.nonce) == data_key
    from sealserve.errors import CryptoError

    for kwargs in (
        {"private_key": X25519PrivateKey.generate(), "key_id": "k", "nonce": ev.nonce},
        {"private_key": hpke_key, "key_id": "other", "nonce": ev.nonce},
        {"private_key": hpke_key, "key_id": "k", "nonce": bytes(32)},
    ):
        with pytest.raises(CryptoError, match="does not open with this enclave's HPKE key"):
            open_data_key(sealed, **kwargs)  # type: ignore[arg-type]
