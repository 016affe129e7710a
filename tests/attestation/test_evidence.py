"""The Evidence wire format and end-to-end verification on the simulated platform."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence, verify_evidence, verify_evidence_at_time
from sealserve.attestation.policy import (
    DEFAULT_POLICY,
    AllOf,
    AnyOf,
    DebugDisallowed,
    ManifestDigestIn,
    MeasurementIn,
    PlatformIn,
    UnsafeAllowSimulated,
    UnsafePolicyWarning,
)
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import DEFAULT_MEASUREMENT, SimulatedPlatform
from sealserve.errors import EvidenceFormatError, PolicyError, VerificationError
from tests.attestation.conftest import SIGNERS, read_vector

MANIFEST = b'{"package":"sealserve","version":"0.1.0"}'
SPKI = b"tls-spki-der"
HPKE = b"h" * 32
NOW = datetime.now(UTC)
DEV_POLICY = AllOf(
    [AnyOf([PlatformIn({Platform.SEV_SNP}), UnsafeAllowSimulated()]), DebugDisallowed()]
)


@pytest.fixture(autouse=True)
def _quiet_unsafe() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePolicyWarning)
        yield


@pytest.fixture
def nonce() -> bytes:
    return os.urandom(32)


@pytest.fixture
def roots(sim_root: Path) -> TrustedRoots:
    return TrustedRoots.amd() + TrustedRoots.from_dir(sim_root)


def _evidence(sim_root: Path, nonce: bytes, **platform_args: object) -> Evidence:
    platform = SimulatedPlatform(sim_root, **platform_args)  # type: ignore[arg-type]
    return attest(platform, nonce=nonce, tls_spki=SPKI, manifest=MANIFEST, hpke_public_key=HPKE)


def test_wire_round_trip(sim_root: Path, nonce: bytes) -> None:
    ev = _evidence(sim_root, nonce)
    data = ev.to_bytes()
    assert data[:5] == b"SSEV\x02"
    assert Evidence.from_bytes(data) == ev


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: b"XXXX" + d[4:], "wrong magic"),
        (lambda d: d[:4] + b"\x01" + d[5:], "unsupported evidence format version 1"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x00", "trailing bytes"),
        (lambda d: d[:3], "wrong magic"),
        (lambda d: d[:5], "missing field platform"),
        (lambda d: d[:5] + b"\x02\x00\x00\x00\x00", "unexpected tag 2"),
        (lambda d: d[:5] + b"\x01\x00\x00\x00\x03abc" + d[27:], "unknown platform"),
        (lambda d: d[:5] + b"\x01\x7f\xff\xff\xff", "truncated or too long"),
    ],
)
def test_malformed_evidence(sim_root: Path, nonce: bytes, mutate: object, match: str) -> None:
    data = _evidence(sim_root, nonce).to_bytes()
    with pytest.raises(EvidenceFormatError, match=match) as err:
        Evidence.from_bytes(mutate(data))  # type: ignore[operator]
    assert err.value.check == "evidence"


def test_simulated_evidence_verifies_with_the_local_root(
    sim_root: Path, roots: TrustedRoots, nonce: bytes
) -> None:
    ev = Evidence.from_bytes(_evidence(sim_root, nonce).to_bytes())
    claims = verify_evidence_at_time(
        ev, policy=DEV_POLICY, roots=roots, expected_nonce=nonce, now=NOW
    )
    assert claims.platform is Platform.SIMULATED_SNP and claims.simulated
    assert claims.fields["platform"] == "simulated-sev-snp"
    label = next(c for c in claims.checks if c.name == "platform")
    assert label.passed is None and label.detail.startswith("SIMULATED SEV-SNP: not a real TEE")
    assert claims.measurements["measurement"] == DEFAULT_MEASUREMENT
    assert claims.manifest_digest == ev.manifest_digest
    names = [c.name for c in claims.checks]
    assert names[-5:] == [
        "nonce", "report_data_binding", "manifest_digest", "runtime_keys", "policy"
    ]  # fmt: skip
    assert claims.runtime_keys == RuntimeKeys() and "audit_key" not in claims.fields
    # the current-time variant agrees
    assert verify_evidence(ev, policy=DEV_POLICY, roots=roots, expected_nonce=nonce).simulated


def test_simulated_evidence_fails_with_amd_roots_only(sim_root: Path, nonce: bytes) -> None:
    with pytest.raises(VerificationError, match="trusted_root") as err:
        verify_evidence_at_time(
            _evidence(sim_root, nonce),
            policy=DEV_POLICY,
            roots=TrustedRoots.amd(),
            expected_nonce=nonce,
            now=NOW,
        )
    assert err.value.check == "trusted_root"


def test_default_policy_rejects_simulated(
    sim_root: Path, roots: TrustedRoots, nonce: bytes
) -> None:
    with pytest.raises(PolicyError, match="simulated evidence is not a real TEE"):
        verify_evidence_at_time(
            _evidence(sim_root, nonce),
            policy=DEFAULT_POLICY,
            roots=roots,
            expected_nonce=nonce,
            now=NOW,
        )


def test_simulated_debug_guest_rejected(sim_root: Path, roots: TrustedRoots, nonce: bytes) -> None:
    with pytest.raises(PolicyError, match="DEBUG policy bit is set"):
        verify_evidence_at_time(
            _evidence(sim_root, nonce, debug=True),
            policy=DEV_POLICY,
            roots=roots,
            expected_nonce=nonce,
            now=NOW,
        )


def test_wrong_nonce_is_replay(sim_root: Path, roots: TrustedRoots, nonce: bytes) -> None:
    with pytest.raises(VerificationError, match="answers another nonce") as err:
        verify_evidence_at_time(
            _evidence(sim_root, nonce),
            policy=DEV_POLICY,
            roots=roots,
            expected_nonce=os.urandom(32),
            now=NOW,
        )
    assert err.value.check == "nonce"


def test_short_expected_nonce_refused(sim_root: Path, roots: TrustedRoots, nonce: bytes) -> None:
    with pytest.raises(VerificationError, match="nonce must be 32"):
        verify_evidence_at_time(
            _evidence(sim_root, nonce), policy=DEV_POLICY, roots=roots, expected_nonce=b"x", now=NOW
        )


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": b"N" * 32},  # evidence re-labelled with another nonce
        {"tls_spki": b"another TLS key"},
        {"manifest": b'{"package":"evil"}'},
        {"hpke_public_key": b"e" * 32},
    ],
)
def test_binding_mismatch_names_the_check(
    sim_root: Path, roots: TrustedRoots, nonce: bytes, change: dict[str, bytes]
) -> None:
    ev = dataclasses.replace(_evidence(sim_root, nonce), **change)
    with pytest.raises(VerificationError, match="report_data_binding") as err:
        verify_evidence_at_time(
            ev, policy=DEV_POLICY, roots=roots, expected_nonce=ev.nonce, now=NOW
        )
    assert err.value.check == "report_data_binding"


def test_manifest_digest_and_measurement_policies(
    sim_root: Path, roots: TrustedRoots, nonce: bytes
) -> None:
    ev = _evidence(sim_root, nonce)
    ok = AllOf([DEV_POLICY, ManifestDigestIn([ev.manifest_digest.hex()])])
    verify_evidence_at_time(ev, policy=ok, roots=roots, expected_nonce=nonce, now=NOW)
    bad = AllOf([DEV_POLICY, ManifestDigestIn([bytes(32)])])
    with pytest.raises(PolicyError, match=r"manifest digest [0-9a-f]+ is not in the allowed list"):
        verify_evidence_at_time(ev, policy=bad, roots=roots, expected_nonce=nonce, now=NOW)
    other = AllOf([DEV_POLICY, MeasurementIn("measurement", [bytes(48)])])
    with pytest.raises(PolicyError, match=r"measurement [0-9a-f]+ is not in the allowed list"):
        verify_evidence_at_time(ev, policy=other, roots=roots, expected_nonce=nonce, now=NOW)


def test_platform_label_must_match_the_chain(
    sim_root: Path, roots: TrustedRoots, nonce: bytes
) -> None:
    ev = dataclasses.replace(_evidence(sim_root, nonce), platform=Platform.SEV_SNP)
    with pytest.raises(VerificationError, match="labelled sev-snp but its chain") as err:
        verify_evidence_at_time(ev, policy=DEV_POLICY, roots=roots, expected_nonce=nonce, now=NOW)
    assert err.value.check == "platform"


def test_snp_report_labelled_tdx_is_refused(
    sim_root: Path, roots: TrustedRoots, nonce: bytes
) -> None:
    ev = dataclasses.replace(_evidence(sim_root, nonce), platform=Platform.TDX)
    with_intel = roots + TrustedRoots.intel_sgx()
    with pytest.raises(EvidenceFormatError) as info:
        verify_evidence_at_time(
            ev, policy=DEV_POLICY, roots=with_intel, expected_nonce=nonce, now=NOW
        )  # fmt: skip
    assert info.value.check == "quote_format"


def test_genuine_tdx_quote_in_evidence_goes_through_tdx_verifier(nonce: bytes) -> None:
    # The same evidence path verifies TDX quotes; a genuine quote cannot bind our nonce.
    from datetime import UTC, datetime

    ev = Evidence(
        platform=Platform.TDX,
        report=read_vector("tdx/go-tdx-guest/quote_v5_sample.dat"),
        certs=b"",
        manifest=MANIFEST,
        tls_spki=SPKI,
        hpke_public_key=HPKE,
        nonce=nonce,
    )
    with pytest.raises(VerificationError) as info:
        verify_evidence_at_time(
            ev, policy=DEV_POLICY, roots=TrustedRoots.vendors(), expected_nonce=nonce,
            now=datetime(2026, 6, 1, tzinfo=UTC),
        )  # fmt: skip
    assert info.value.check == "report_data_binding"
    # AMD's roots alone do not trust Intel's: a TDX quote is refused before anything else.
    with pytest.raises(VerificationError, match="Intel SGX Root CA, which is not among") as info:
        verify_evidence_at_time(
            ev, policy=DEV_POLICY, roots=TrustedRoots.amd(), expected_nonce=nonce,
            now=datetime(2026, 6, 1, tzinfo=UTC),
        )  # fmt: skip
    assert info.value.check == "roots"


def test_genuine_report_in_evidence_fails_binding(nonce: bytes) -> None:
    # A genuine AMD report replayed inside our evidence cannot bind our nonce.
    rel = "sev-snp/trustee/test-report.bin"
    from sealserve.attestation.snp_certs import VCEK_GUID, CertTable

    ev = Evidence(
        platform=Platform.SEV_SNP,
        report=read_vector(rel),
        certs=CertTable.build({VCEK_GUID: SIGNERS[rel]}).to_bytes(),
        manifest=MANIFEST,
        tls_spki=SPKI,
        hpke_public_key=HPKE,
        nonce=nonce,
    )
    with pytest.raises(VerificationError, match="report_data_binding"):
        verify_evidence_at_time(
            ev,
            policy=DEFAULT_POLICY,
            roots=TrustedRoots.amd(),
            expected_nonce=nonce,
            now=datetime(2025, 6, 1, tzinfo=UTC),
        )


def test_evidence_constructor_checks_types() -> None:
    with pytest.raises(EvidenceFormatError, match="report must be bytes"):
        Evidence(Platform.SEV_SNP, "x", b"", b"", b"", b"", b"")  # type: ignore[arg-type]
