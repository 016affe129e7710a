"""Verifying genuine AMD SEV-SNP vectors, tampered copies and wrong chains."""

from __future__ import annotations

import dataclasses
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sealserve.attestation.claims import Platform
from sealserve.attestation.policy import DEFAULT_POLICY
from sealserve.attestation.snp_certs import (
    AMD_PINS,
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
    TrustedRoots,
    fingerprint,
    load_amd_certificate,
    require_signed_by,
)
from sealserve.attestation.snp_verify import verify_snp, verify_snp_at_time
from sealserve.errors import ConfigError, EvidenceFormatError, PolicyError, VerificationError
from tests.attestation.conftest import EXPECTED, NOW, SIGNERS, SNP, read_vector

ROOTS = TrustedRoots.amd()


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_genuine_report_verifies_and_decodes_exactly(rel: str) -> None:
    claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    assert claims.platform is Platform.SEV_SNP
    assert {k: claims.fields[k] for k in EXPECTED[rel]} == EXPECTED[rel]
    assert claims.measurements["measurement"].hex() == EXPECTED[rel]["measurement"]
    assert claims.report_data.hex() == EXPECTED[rel]["report_data"]
    names = [c.name for c in claims.checks]
    for step in (
        "ark_self_signed",
        "ask_signature",
        "vcek_signature",
        "validity_period",
        "vcek_tcb",
        "vcek_hwid",
        "report_signature",
    ):
        assert step in names
    assert all(c.passed is not False for c in claims.checks)


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_tampered_copy_fails_the_report_signature(rel: str) -> None:
    tampered = read_vector(rel.replace(".bin", ".tampered.bin"))
    with pytest.raises(VerificationError, match="report_signature") as err:
        verify_snp_at_time(tampered, roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    assert err.value.check == "report_signature"


def test_debug_report_verifies_but_default_policy_rejects_it() -> None:
    rel = "sev-snp/go-sev-guest/attestation.bin"
    claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    assert claims.debug
    with pytest.raises(PolicyError, match="DEBUG policy bit is set"):
        DEFAULT_POLICY.verify(claims)


def test_report_against_another_chips_vcek_fails() -> None:
    other = (SNP / "trustee/test-vcek.der").read_bytes()
    with pytest.raises(VerificationError) as err:
        verify_snp_at_time(
            read_vector("sev-snp/go-sev-guest/attestation.bin"),
            roots=ROOTS,
            now=NOW,
            signer_cert=other,
        )
    # TCB differs too (bl 2 vs 3), which is checked before hwID and the signature.
    assert err.value.check in {"vcek_tcb", "vcek_hwid", "report_signature"}
    assert err.value.check in str(err.value)


def test_same_tcb_other_chip_fails_on_hwid() -> None:
    # virtee and trustee Milan reports share REPORTED_TCB 3/0/8/115, not the chip.
    with pytest.raises(VerificationError, match="hwID does not equal the report's CHIP_ID"):
        verify_snp_at_time(
            read_vector("sev-snp/virtee-sev/report_milan.bin"),
            roots=ROOTS,
            now=NOW,
            signer_cert=SIGNERS["sev-snp/trustee/test-report.bin"],
        )


@pytest.mark.parametrize("name", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_synthetic_vceks_fail_the_ask_signature(name: str) -> None:
    with pytest.raises(VerificationError, match="is not signed by SEV-Milan") as err:
        verify_snp_at_time(
            read_vector("sev-snp/trustee/test-report.bin"),
            roots=ROOTS,
            now=NOW,
            signer_cert=(SNP / "trustee" / name).read_bytes(),
        )
    assert err.value.check == "vcek_signature"


def test_expired_vlek_passes_inside_and_fails_after_its_validity() -> None:
    rel = "sev-snp/trustee/test-vlek-report.bin"
    claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    assert claims.fields["signing_key"] == "VLEK"
    after = datetime(2025, 12, 11, tzinfo=UTC)
    with pytest.raises(VerificationError, match="validity_period: SEV-VLEK is valid") as err:
        verify_snp_at_time(read_vector(rel), roots=ROOTS, now=after, signer_cert=SIGNERS[rel])
    assert err.value.check == "validity_period"
    # verify_snp uses the real clock: the VLEK is expired today.
    with pytest.raises(VerificationError, match="validity_period"):
        verify_snp(read_vector(rel), roots=ROOTS, signer_cert=SIGNERS[rel])


def test_before_not_before_fails() -> None:
    rel = "sev-snp/trustee/test-report.bin"
    with pytest.raises(VerificationError, match="validity_period"):
        verify_snp_at_time(
            read_vector(rel),
            roots=ROOTS,
            now=datetime(2015, 1, 1, tzinfo=UTC),
            signer_cert=SIGNERS[rel],
        )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_snp_at_time(b"", roots=ROOTS, now=datetime(2025, 1, 1))


def test_vcek_from_the_cert_table() -> None:
    rel = "sev-snp/trustee/test-report.bin"
    table = CertTable.build({VCEK_GUID: SIGNERS[rel]}).to_bytes()
    claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, cert_table=table)
    assert claims.fields["chip_id"] == EXPECTED[rel]["chip_id"]


def test_vlek_from_the_cert_table() -> None:
    rel = "sev-snp/trustee/test-vlek-report.bin"
    table = CertTable.build({VLEK_GUID: SIGNERS[rel]}).to_bytes()
    claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, cert_table=table)
    assert claims.fields["signer_issuer"] == "SEV-VLEK-Milan"


def test_missing_vcek_is_named() -> None:
    rel = "sev-snp/trustee/test-report.bin"
    table = CertTable.build({ASK_GUID: b"x", ARK_GUID: b"y"}).to_bytes()
    with pytest.raises(VerificationError, match="vcek_missing: no VCEK certificate") as err:
        verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, cert_table=table)
    assert err.value.check == "vcek_missing"


def test_vcek_from_a_local_cache_directory(tmp_path: Path) -> None:
    for rel, der in SIGNERS.items():
        (tmp_path / (Path(rel).stem + ".der")).write_bytes(der)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    for rel in ("sev-snp/trustee/test-report.bin", "sev-snp/virtee-sev/report_milan.bin"):
        claims = verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, cache_dir=tmp_path)
        assert claims.fields["chip_id"] == EXPECTED[rel]["chip_id"]


def test_garbage_vcek_is_a_format_error() -> None:
    with pytest.raises(EvidenceFormatError, match=r"not a parseable X\.509 certificate"):
        verify_snp_at_time(
            read_vector("sev-snp/trustee/test-report.bin"), roots=ROOTS, now=NOW, signer_cert=b"xx"
        )


def test_genoa_roots_do_not_verify_a_milan_vcek() -> None:
    genoa_only = TrustedRoots(tuple(s for s in ROOTS.sets if s.name == "Genoa"))
    rel = "sev-snp/trustee/test-report.bin"
    with pytest.raises(VerificationError, match="trusted_root: the VCEK's issuer 'SEV-Milan'"):
        verify_snp_at_time(read_vector(rel), roots=genoa_only, now=NOW, signer_cert=SIGNERS[rel])


def test_packaged_roots_match_their_pins_and_chain() -> None:
    assert [s.name for s in ROOTS.sets] == ["Milan", "Genoa", "Turin"]
    for root_set in ROOTS.sets:
        assert root_set.genuine_amd
        assert root_set.ask is not None and root_set.asvk is not None
        assert fingerprint(root_set.ark) == AMD_PINS[root_set.name]["ark"]
        require_signed_by(root_set.ark, root_set.ark, check="ark_self_signed", what="ARK")
        require_signed_by(root_set.ask, root_set.ark, check="ask_signature", what="ASK")
        require_signed_by(root_set.asvk, root_set.ark, check="ask_signature", what="ASVK")


def test_vector_chains_use_the_pinned_roots() -> None:
    for name in ("milan_ask_ark_asvk.pem", "genoa_ask_ark_asvk.pem"):
        pem = (SNP / "trustee" / name).read_bytes()
        fps = {fingerprint(c) for c in x509.load_pem_x509_certificates(pem)}
        assert fps <= {fp for pins in AMD_PINS.values() for fp in pins.values()}


def test_ask_not_signed_by_ark_fails_ask_signature() -> None:
    milan, genoa = ROOTS.sets[0], ROOTS.sets[1]
    mixed = TrustedRoots((dataclasses.replace(milan, ark=genoa.ark),))
    rel = "sev-snp/trustee/test-report.bin"
    with pytest.raises(VerificationError, match="ask_signature: SEV-Milan is not signed by"):
        verify_snp_at_time(read_vector(rel), roots=mixed, now=NOW, signer_cert=SIGNERS[rel])


def test_serial_zero_warning_is_handled_locally() -> None:
    load_amd_certificate.cache_clear()
    rel = "sev-snp/trustee/test-report.bin"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
        # The filter was scoped: loading the same certificate directly still warns.
        x509.load_der_x509_certificate(SIGNERS[rel])
    assert len(caught) == 1 and "serial number" in str(caught[0].message)


def test_warm_verification_reuses_parsed_certificates() -> None:
    rel = "sev-snp/trustee/test-report.bin"
    verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    before = load_amd_certificate.cache_info().hits
    verify_snp_at_time(read_vector(rel), roots=ROOTS, now=NOW, signer_cert=SIGNERS[rel])
    assert load_amd_certificate.cache_info().hits > before
    der = load_amd_certificate(SIGNERS[rel]).public_bytes(Encoding.DER)
    assert der == SIGNERS[rel]


def test_trusted_roots_from_a_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trusted roots"):
        TrustedRoots.from_dir(tmp_path)
    ark = ROOTS.sets[0].ark.public_bytes(Encoding.PEM)
    (tmp_path / "ark.pem").write_bytes(ark)
    with pytest.raises(ConfigError, match=r"holds no ask\.pem or asvk\.pem"):
        TrustedRoots.from_dir(tmp_path)
    (tmp_path / "ask.pem").write_bytes(ROOTS.sets[0].ask.public_bytes(Encoding.PEM))  # type: ignore[union-attr]
    local = TrustedRoots.from_dir(tmp_path)
    # AMD's own certificates in a directory are still recognised as genuine.
    assert local.sets[0].genuine_amd
    rel = "sev-snp/trustee/test-report.bin"
    claims = verify_snp_at_time(read_vector(rel), roots=local, now=NOW, signer_cert=SIGNERS[rel])
    assert claims.platform is Platform.SEV_SNP


def test_kds_url_is_product_generic() -> None:
    from sealserve.attestation.snp_certs import kds_vcek_url

    chip = bytes(range(64))
    milan = kds_vcek_url("Milan", chip, {"bl": 3, "tee": 0, "snp": 8, "ucode": 115})
    assert milan == (
        f"https://kdsintf.amd.com/vcek/v1/Milan/{chip.hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    )
    turin = kds_vcek_url("Turin", chip, {"fmc": 1, "bl": 3, "tee": 0, "snp": 8, "ucode": 115})
    assert turin.startswith(f"https://kdsintf.amd.com/vcek/v1/Turin/{chip[:8].hex()}?fmcSPL=1&")
