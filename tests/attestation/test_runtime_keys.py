"""The runtime keys record: parsing, and its binding into evidence (REPORT_DATA v2)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealserve.attestation.evidence import Evidence, verify_evidence_at_time
from sealserve.attestation.policy import UnsafeAllowSimulated, UnsafePolicyWarning
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS, SCHEMA, RuntimeKeys
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import EvidenceFormatError, VerificationError

KEY = bytes(range(32))
NOW = datetime.now(UTC)


@pytest.fixture(autouse=True)
def _quiet_unsafe() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePolicyWarning)
        yield


def test_record_round_trip_and_fingerprint() -> None:
    record = RuntimeKeys(audit_public_key=KEY)
    data = record.to_bytes()
    assert data == (
        b'{"audit":{"alg":"Ed25519","public_key":"' + KEY.hex().encode() + b'"},'
        b'"schema":"sealserve.runtime-keys/v1"}'
    )
    assert RuntimeKeys.from_bytes(data) == record
    assert record.audit_fingerprint == "sha256:" + hashlib.sha256(KEY).hexdigest()
    assert record.digest() == hashlib.sha256(data).digest()
    assert RuntimeKeys.from_bytes(NO_RUNTIME_KEYS) == RuntimeKeys()
    assert RuntimeKeys().audit_fingerprint is None


def _audit(alg: str, key: str) -> bytes:
    return (
        b'{"audit":{"alg":"' + alg.encode() + b'","public_key":"' + key.encode()
        + b'"},"schema":"' + SCHEMA.encode() + b'"}'
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"[]", 'exactly "schema" and "audit"'),
        (b'{"audit":null,"schema":"sealserve.runtime-keys/v1","x":1}', 'exactly "schema"'),
        (b'{"audit":null,"schema":"sealserve.runtime-keys/v9"}', "unknown schema"),
        (_audit("RSA", "00"), "algorithm 'RSA'"),
        (_audit("Ed25519", "abcd"), "64 hex characters"),
        (_audit("Ed25519", "zz" * 32), "64 hex characters"),
        (b'{"schema":"sealserve.runtime-keys/v1","audit":null}', "canonical form"),
        (b" " * 5000, "limit 4096"),
    ],
)
def test_malformed_records_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match) as err:
        RuntimeKeys.from_bytes(data)
    assert err.value.check == "runtime_keys" and err.value.message.startswith("runtime_keys: ")


def test_constructor_checks_the_key() -> None:
    with pytest.raises(EvidenceFormatError, match="32 raw Ed25519 bytes"):
        RuntimeKeys(audit_public_key=b"short")


def _evidence(sim_root: Path, nonce: bytes, runtime_keys: bytes) -> Evidence:
    return attest(
        SimulatedPlatform(sim_root), nonce=nonce, tls_spki=b"spki", manifest=b"{}",
        hpke_public_key=b"h" * 32, runtime_keys=runtime_keys,
    )  # fmt: skip


def _verify(ev: Evidence, sim_root: Path, nonce: bytes) -> object:
    return verify_evidence_at_time(
        ev, policy=UnsafeAllowSimulated(), roots=TrustedRoots.from_dir(sim_root),
        expected_nonce=nonce, now=NOW,
    )  # fmt: skip


def test_verified_evidence_exposes_its_runtime_keys(sim_root: Path) -> None:
    nonce = os.urandom(32)
    record = RuntimeKeys(audit_public_key=KEY)
    ev = Evidence.from_bytes(_evidence(sim_root, nonce, record.to_bytes()).to_bytes())
    claims = verify_evidence_at_time(
        ev, policy=UnsafeAllowSimulated(), roots=TrustedRoots.from_dir(sim_root),
        expected_nonce=nonce, now=NOW,
    )  # fmt: skip
    assert claims.runtime_keys == record
    assert claims.fields["audit_key"] == record.audit_fingerprint
    check = next(c for c in claims.checks if c.name == "runtime_keys")
    assert check.detail == f"audit key {record.audit_fingerprint}"


def test_a_record_the_report_does_not_bind_is_refused(sim_root: Path) -> None:
    # An operator (or a machine in the middle) swaps in its own audit key: the report
    # still binds the server's record, so the evidence no longer verifies.
    nonce = os.urandom(32)
    ev = _evidence(sim_root, nonce, RuntimeKeys(audit_public_key=KEY).to_bytes())
    for forged in (
        RuntimeKeys(audit_public_key=bytes(32)).to_bytes(),  # another key
        NO_RUNTIME_KEYS,  # the key stripped
    ):
        swapped = Evidence.from_bytes(dataclasses.replace(ev, runtime_keys=forged).to_bytes())
        with pytest.raises(VerificationError, match="runtime keys") as err:
            _verify(swapped, sim_root, nonce)
        assert err.value.check == "report_data_binding"


def test_a_bound_but_malformed_record_is_refused(sim_root: Path) -> None:
    nonce = os.urandom(32)
    ev = _evidence(sim_root, nonce, b'{"audit":1}')
    with pytest.raises(EvidenceFormatError) as err:
        _verify(ev, sim_root, nonce)
    assert err.value.check == "runtime_keys"
