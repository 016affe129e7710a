"""TDX quote verification against the genuine vectors and negative cases built from them."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sealserve.attestation.claims import Platform
from sealserve.attestation.tdx import verify_tdx, verify_tdx_at_time
from sealserve.attestation.tdx_pck import (
    INTEL_SGX_ROOT_CA_SHA256,
    cert_fingerprint,
    intel_sgx_root_ca,
)
from sealserve.attestation.tdx_quote import TdxQuote
from sealserve.errors import VerificationError

from ._tdx_util import EXPECTED, GENUINE, GO, NOW, TAMPERED, pem_blocks, raw, rebuild


def test_shipped_root_is_pinned_and_matches_the_vectors() -> None:
    root = intel_sgx_root_ca()
    assert cert_fingerprint(root) == INTEL_SGX_ROOT_CA_SHA256
    vector_root = x509.load_pem_x509_certificate((GO / "intel_sgx_root_ca.pem").read_bytes())
    assert vector_root == root


@pytest.mark.parametrize("name", GENUINE)
def test_genuine_quote_verifies_and_decodes_to_expected_fields(name: str) -> None:
    claims = verify_tdx_at_time(raw(name), now=NOW)
    expected = EXPECTED[name]
    assert dict(claims.fields) == expected
    assert claims.platform is Platform.TDX
    assert claims.report_data.hex() == expected["report_data"]
    assert claims.debug is expected["td_debug"]
    assert claims.measurements["mrtd"].hex() == expected["mrtd"]
    assert [claims.measurements[f"rtmr{i}"].hex() for i in range(4)] == expected["rtmr"]
    assert set(claims.measurements) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    passed = {c.name for c in claims.checks if c.passed is True}
    assert {
        "validity_period",
        "pck_chain",
        "qe_report_signature",
        "qe_report_binding",
        "quote_signature",
    } <= passed
    assert all(c.passed is not False for c in claims.checks)
    tcb = next(c for c in claims.checks if c.name == "tcb_status")
    assert tcb.passed is None and "no collateral" in tcb.detail
    assert next(c for c in claims.checks if c.name == "crl").passed is None


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_quote_fails_its_signature(name: str) -> None:
    with pytest.raises(VerificationError, match="quote_signature") as info:
        verify_tdx_at_time(raw(name), now=NOW)
    assert info.value.check == "quote_signature"
    assert "not signed by the attestation key" in info.value.message


def test_debug_td_verifies_and_claims_debug() -> None:
    claims = verify_tdx_at_time(raw("tdx/trustee/tdx_quote_4.dat"), now=NOW)
    assert claims.debug is True
    assert claims.fields["td_debug"] is True
    assert claims.fields["td_attributes"] == "0100001000000000"


def test_non_debug_tds_do_not_claim_debug() -> None:
    for name in GENUINE:
        if name.endswith("tdx_quote_4.dat"):
            continue
        assert verify_tdx_at_time(raw(name), now=NOW).debug is False


@pytest.mark.parametrize("name", GENUINE)
def test_rebuild_helper_is_faithful(name: str) -> None:
    original = raw(name)
    q = TdxQuote.from_bytes(original)
    assert rebuild(original) == original[: len(original) - q.trailing]


@pytest.mark.parametrize("name", GENUINE)
def test_cut_pck_chain_fails_pck_chain(name: str) -> None:
    q = TdxQuote.from_bytes(raw(name))
    leaf, _intermediate, root = pem_blocks(q.pck_chain_pem)
    cut = rebuild(raw(name), pck_chain_pem=leaf + root)
    with pytest.raises(VerificationError, match="pck_chain") as info:
        verify_tdx_at_time(cut, now=NOW)
    assert info.value.check == "pck_chain"
    assert "Platform/Processor CA" in info.value.message


def test_leaf_only_chain_fails_pck_chain() -> None:
    q = TdxQuote.from_bytes(raw(GENUINE[0]))
    leaf = pem_blocks(q.pck_chain_pem)[0]
    with pytest.raises(VerificationError, match="pck_chain") as info:
        verify_tdx_at_time(rebuild(raw(GENUINE[0]), pck_chain_pem=leaf), now=NOW)
    assert info.value.check == "pck_chain"


def _fake_root() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2018, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2049, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.PEM)


def test_foreign_root_in_chain_fails_pck_chain() -> None:
    name = GENUINE[0]
    leaf, intermediate, _root = pem_blocks(TdxQuote.from_bytes(raw(name)).pck_chain_pem)
    forged = rebuild(raw(name), pck_chain_pem=leaf + intermediate + _fake_root())
    with pytest.raises(VerificationError, match="pinned") as info:
        verify_tdx_at_time(forged, now=NOW)
    assert info.value.check == "pck_chain"


def test_swapped_leaf_fails_qe_report_signature() -> None:
    # A genuine PCK chain from another platform: the chain is fine, the QE report is
    # not signed by that leaf's key.
    a, b = "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat", "tdx/trustee/tdx_quote_4.dat"
    other = TdxQuote.from_bytes(raw(b)).pck_chain_pem
    with pytest.raises(VerificationError, match="qe_report_signature") as info:
        verify_tdx_at_time(rebuild(raw(a), pck_chain_pem=other), now=NOW)
    assert info.value.check == "qe_report_signature"
    assert "PCK certificate's key" in info.value.message


def test_flipped_qe_report_byte_fails_qe_report_signature() -> None:
    name = GENUINE[0]
    q = TdxQuote.from_bytes(raw(name))
    data = bytearray(raw(name))
    offset = len(q.signed_data) + 4 + 64 + 64 + 6  # start of the QE report
    data[offset + 1] ^= 0x01  # QE CPUSVN: covered by the PCK's signature only
    with pytest.raises(VerificationError, match="qe_report_signature") as info:
        verify_tdx_at_time(bytes(data), now=NOW)
    assert info.value.check == "qe_report_signature"


@pytest.mark.parametrize("name", GENUINE)
def test_broken_qe_binding_fails_qe_report_binding(name: str) -> None:
    # QE auth data is hashed into QE report_data but signed by nothing else, so
    # flipping it leaves the QE report signature valid and breaks only the binding.
    q = TdxQuote.from_bytes(raw(name))
    auth = bytearray(q.qe_auth_data)
    auth[0] ^= 0x01
    with pytest.raises(VerificationError, match="qe_report_binding") as info:
        verify_tdx_at_time(rebuild(raw(name), qe_auth_data=bytes(auth)), now=NOW)
    assert info.value.check == "qe_report_binding"
    assert "SHA-256(attestation key" in info.value.message


def test_replaced_attestation_key_fails_binding() -> None:
    name = GENUINE[0]
    q = TdxQuote.from_bytes(raw(name))
    data = bytearray(raw(name))
    data[len(q.signed_data) + 4 + 64 + 5] ^= 0x01  # inside the attestation key
    with pytest.raises(VerificationError) as info:
        verify_tdx_at_time(bytes(data), now=NOW)
    assert info.value.check == "qe_report_binding"


@pytest.mark.parametrize(
    "now",
    [
        datetime.datetime(2060, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
    ],
)
def test_outside_validity_period_fails(now: datetime.datetime) -> None:
    with pytest.raises(VerificationError, match="validity_period") as info:
        verify_tdx_at_time(raw("tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat"), now=now)
    assert info.value.check == "validity_period"
    assert "Intel SGX PCK" in info.value.message


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_tdx_at_time(raw(GENUINE[0]), now=datetime.datetime(2026, 1, 1))


def test_verify_tdx_uses_the_clock() -> None:
    # Every PCK leaf is valid until 2029 or later, so "now" verifies while this
    # suite is maintained; the result matches the fixed-clock result.
    name = "tdx/go-tdx-guest/quote_v5_sample.dat"
    assert verify_tdx(raw(name)).fields == verify_tdx_at_time(raw(name), now=NOW).fields


def test_claims_are_immutable() -> None:
    claims = verify_tdx_at_time(raw(GENUINE[0]), now=NOW)
    with pytest.raises(TypeError):
        claims.fields["mrtd"] = "00"  # type: ignore[index]
    assert claims.extra["mrsignerseam"] == "00" * 48


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qe_vendor_id": bytes(16)}, "QE vendor id 0000"),
        ({"mrsigner": bytes(32)}, "QE MRSIGNER 0000000000000000... is not Intel's"),
        ({"isvprodid": 1}, "QE ISVPRODID 1 is not the TD QE's"),
    ],
)
def test_quote_from_another_quoting_enclave_is_refused_without_collateral(
    change: dict[str, object], message: str
) -> None:
    # Such a quote cannot be made with a genuine PCK (the QE report is signed), so the
    # check is exercised on the parsed quote; it runs on every quote, collateral or not.
    import dataclasses

    from sealserve.attestation.tdx import check_intel_qe
    from sealserve.attestation.tdx_quote import TdxQuote

    quote = TdxQuote.from_bytes(raw(GENUINE[0]))
    assert check_intel_qe(quote).passed is True
    if "qe_vendor_id" in change:
        quote = dataclasses.replace(quote, header=dataclasses.replace(quote.header, **change))
    else:
        quote = dataclasses.replace(quote, qe_report=dataclasses.replace(quote.qe_report, **change))
    with pytest.raises(VerificationError, match=message) as info:
        check_intel_qe(quote)
    assert info.value.check == "qe_identity"
