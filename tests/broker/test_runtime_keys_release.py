"""The broker checks the runtime keys record like the rest of the evidence: a record
that REPORT_DATA does not bind gets no key (one opaque refusal, the check in the log)."""

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
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS, RuntimeKeys
from sealserve.enclave.key_release import fetch_model_key, hpke_public_bytes
from sealserve.enclave.model_file import generate_key
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform
from tests.broker.conftest import PINNED_POLICY, Running

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]

SERVER_KEYS = RuntimeKeys(audit_public_key=b"\x01" * 32).to_bytes()


def test_a_runtime_keys_record_the_report_does_not_bind_gets_no_key(
    start_broker: Callable[..., Running], sim_root: Path, hpke_key: X25519PrivateKey, caplog: Any
) -> None:
    running = start_broker()
    data_key = generate_key()
    with running.admin() as admin:
        admin.add_key("m", data_key, policy_toml=PINNED_POLICY, roots=["unsafe-simulated"])
    platform = SimulatedPlatform(sim_root)
    channel = grpc.secure_channel(
        running.target, grpc.ssl_channel_credentials(root_certificates=running.ca_pem)
    )
    stub = broker_pb2_grpc.KeyBrokerStub(channel)
    refusals = []
    with channel, caplog.at_level(logging.INFO, logger="sealserve.broker"):
        for forged in (RuntimeKeys(audit_public_key=b"\x02" * 32).to_bytes(), NO_RUNTIME_KEYS):
            nonce = bytes(stub.GetChallenge(bpb.GetChallengeRequest(), timeout=10).nonce)
            ev = attest(
                platform, nonce=nonce, tls_spki=b"spki", manifest=b"{}",
                hpke_public_key=hpke_public_bytes(hpke_key), runtime_keys=SERVER_KEYS,
            )  # fmt: skip
            swapped = dataclasses.replace(ev, runtime_keys=forged)
            with pytest.raises(grpc.RpcError) as info:
                stub.ReleaseKey(
                    bpb.ReleaseKeyRequest(key_id="m", evidence=swapped.to_bytes()), timeout=10
                )
            refusals.append((info.value.code(), info.value.details()))
    assert refusals == [(grpc.StatusCode.PERMISSION_DENIED, "key release refused")] * 2
    checks = [r.check for r in caplog.records if getattr(r, "event", "") == "key_release_refused"]
    assert checks == ["report_data_binding"] * 2
    # The server's own record, as bound, is released to.
    released = fetch_model_key(
        running.target, key_id="m", platform=platform, tls_spki=b"spki", manifest=b"{}",
        hpke_private_key=hpke_key, broker_ca_pem=running.ca_pem, runtime_keys=SERVER_KEYS,
        timeout=10, wait=30,
    )  # fmt: skip
    assert released == data_key
