"""TDX collateral: TCB status, QE identity, CRLs, freshness and collateral signatures.

Genuine collateral comes from the vectors. Where a case needs a TCB info the vectors do
not hold (UpToDate for the SPR_E4 platform, OutOfDate, Revoked, TD relaunch), the test
edits the genuine JSON in memory, the way go-tdx-guest's own tests do; the signature of
such a copy is not checked (no TCB-signing chain), exactly as for the originals.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_collateral import (
    QeIdentity,
    TcbInfo,
    TdxCollateral,
    load_crl,
)
from sealserve.attestation.tdx_pck import PckChain
from sealserve.attestation.tdx_tcb import check_crls, verify_collateral_signatures
from sealserve.errors import EvidenceFormatError, VerificationError

from ._tdx_util import GO, NOW, NOW_2023, NOW_2026_02, TRUSTEE, raw

SPR = "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
V5 = "tdx/go-tdx-guest/quote_v5_sample.dat"
T5 = "tdx/trustee/tdx_quote_5.dat"


def _edited(path: Any, key: str, edit: Any) -> str:
    body = json.loads(path.read_text())
    edit(body[key])
    return json.dumps(body)


def _zero_level0(info: dict[str, Any]) -> None:
    for comp in info["tcbLevels"][0]["tcb"]["sgxtcbcomponents"]:
        comp["svn"] = 0
    for comp in info["tcbLevels"][0]["tcb"]["tdxtcbcomponents"]:
        comp["svn"] = 0


def _check(claims: Any, name: str) -> Any:
    return next(c for c in claims.checks if c.name == name)


def _go_collateral(**overrides: Any) -> TdxCollateral:
    parts: dict[str, Any] = {
        "qe_identity": QeIdentity.from_json(GO / "sample_qeIdentity_response"),
        "root_crl": load_crl(GO / "rootcrl.der", what="root CRL"),
        "pck_crl": load_crl(GO / "pckcrl", what="PCK CRL"),
    }
    parts.update(overrides)
    return TdxCollateral(**parts)


# --- TCB status -----------------------------------------------------------------------


def test_spr_e4_with_genuine_tcb_info_is_not_supported() -> None:
    # Same FMSPC (50806f000000), but the PCK's SGX TCB (03 03 02 02 02 01 00 02, PCESVN
    # 11) is below both levels of this sample (05 05 ...), which go-tdx-guest's own
    # test notes as well: Intel's algorithm says "TCB not supported".
    col = _go_collateral(tcb_info=TcbInfo.from_json(GO / "sample_tcbInfo_response"))
    with pytest.raises(VerificationError, match="no TCB level matches the platform") as info:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=col)
    assert info.value.check == "tcb_status"


def test_spr_e4_with_qe_identity_and_crls_only() -> None:
    claims = verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=_go_collateral())
    assert claims.fields["qe_identity_status"] == "UpToDate"
    assert "tcb_status" not in claims.fields
    assert _check(claims, "crl").passed is True
    assert _check(claims, "qe_identity").passed is True
    assert _check(claims, "tcb_status").passed is None
    sig = _check(claims, "collateral_signature")
    assert sig.passed is None
    assert sig.detail == "not verified: no issuer chain for QE identity"


def test_spr_e4_tcb_status_up_to_date_with_edited_level() -> None:
    info = TcbInfo.from_json(_edited(GO / "sample_tcbInfo_response", "tcbInfo", _zero_level0))
    claims = verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=_go_collateral(tcb_info=info))
    assert claims.fields["tcb_status"] == "UpToDate"
    assert claims.fields["tcb_date"] == "2023-02-15T00:00:00Z"
    assert claims.fields["tcb_advisory_ids"] == []
    assert claims.fields["tcb_evaluation_data_number"] == 15
    assert _check(claims, "tcb_status").passed is True
    assert _check(claims, "collateral_signature").passed is None


def test_spr_e4_out_of_date_level_carries_advisories() -> None:
    def edit(info: dict[str, Any]) -> None:
        for comp in info["tcbLevels"][1]["tcb"]["sgxtcbcomponents"]:
            comp["svn"] = 0
        info["tcbLevels"][1]["tcb"]["tdxtcbcomponents"][2]["svn"] = 0

    info = TcbInfo.from_json(_edited(GO / "sample_tcbInfo_response", "tcbInfo", edit))
    claims = verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=TdxCollateral(tcb_info=info))
    assert claims.fields["tcb_status"] == "OutOfDate"
    assert "INTEL-SA-00106" in claims.fields["tcb_advisory_ids"]


def test_qe_out_of_date_converges_to_out_of_date() -> None:
    info = TcbInfo.from_json(_edited(GO / "sample_tcbInfo_response", "tcbInfo", _zero_level0))

    def edit(ident: dict[str, Any]) -> None:
        ident["tcbLevels"] = [
            {"tcb": {"isvsvn": 8}, "tcbDate": "2023-06-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 4}, "tcbDate": "2023-02-15T00:00:00Z", "tcbStatus": "OutOfDate"},
        ]

    ident = QeIdentity.from_json(
        _edited(GO / "sample_qeIdentity_response", "enclaveIdentity", edit)
    )
    col = TdxCollateral(tcb_info=info, qe_identity=ident)
    claims = verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=col)
    assert claims.fields["qe_identity_status"] == "OutOfDate"
    assert claims.fields["tcb_status"] == "OutOfDate"


def test_revoked_tcb_fails() -> None:
    def edit(info: dict[str, Any]) -> None:
        _zero_level0(info)
        info["tcbLevels"][0]["tcbStatus"] = "Revoked"

    info = TcbInfo.from_json(_edited(GO / "sample_tcbInfo_response", "tcbInfo", edit))
    with pytest.raises(VerificationError, match="Revoked") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "tcb_status"


def test_v5_sample_up_to_date_with_genuine_v5_tcb_info() -> None:
    # Genuine collateral, same FMSPC (90c06f000000); TDX module 1.x (TEE_TCB_SVN[1] = 1)
    # is matched through tdxModuleIdentities["TDX_01"].
    info = TcbInfo.from_json(GO / "sample_tcbinfo_response_v5")
    claims = verify_tdx_at_time(raw(V5), now=NOW_2026_02, collateral=TdxCollateral(tcb_info=info))
    assert claims.fields["tcb_status"] == "UpToDate"
    assert claims.fields["tcb_date"] == "2024-11-13T00:00:00Z"
    assert claims.fields["tcb_evaluation_data_number"] == 18
    assert _check(claims, "crl").passed is None


def test_v5_out_of_date_module_with_current_svn2_is_relaunch_advised() -> None:
    # TEE_TCB_SVN = 0b 01 04 (module ISVSVN 11), TEE_TCB_SVN2 = 0d 01 04 (13): with a
    # TDX_01 identity where 12 is the newest level, the running module is OutOfDate
    # but the platform already has a newer one: Intel says TDRelaunchAdvised.
    def edit(info: dict[str, Any]) -> None:
        module = next(m for m in info["tdxModuleIdentities"] if m["id"] == "TDX_01")
        module["tcbLevels"] = [
            {"tcb": {"isvsvn": 12}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 6}, "tcbDate": "2024-11-13T00:00:00Z", "tcbStatus": "OutOfDate"},
        ]

    info = TcbInfo.from_json(_edited(GO / "sample_tcbinfo_response_v5", "tcbInfo", edit))
    claims = verify_tdx_at_time(raw(V5), now=NOW_2026_02, collateral=TdxCollateral(tcb_info=info))
    assert claims.fields["tcb_status"] == "TDRelaunchAdvised"


def test_v5_module_identity_missing_fails_tdx_module() -> None:
    def edit(info: dict[str, Any]) -> None:
        info["tdxModuleIdentities"] = [
            m for m in info["tdxModuleIdentities"] if m["id"] != "TDX_01"
        ]

    info = TcbInfo.from_json(_edited(GO / "sample_tcbinfo_response_v5", "tcbInfo", edit))
    with pytest.raises(VerificationError, match="TDX_01") as exc:
        verify_tdx_at_time(raw(V5), now=NOW_2026_02, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "tdx_module"


def test_module_signer_mismatch_fails_tdx_module() -> None:
    def edit(info: dict[str, Any]) -> None:
        _zero_level0(info)
        info["tdxModule"]["mrsigner"] = "ff" * 48

    info = TcbInfo.from_json(_edited(GO / "sample_tcbInfo_response", "tcbInfo", edit))
    with pytest.raises(VerificationError, match="MRSIGNERSEAM") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "tdx_module"


def test_trustee_v5_platform_below_every_level() -> None:
    info = TcbInfo.from_json(GO / "sample_tcbinfo_response_v5")
    with pytest.raises(VerificationError, match="TCB not supported") as exc:
        verify_tdx_at_time(raw(T5), now=NOW_2026_02, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "tcb_status"


def test_tcb_info_for_another_fmspc_fails() -> None:
    info = TcbInfo.from_json(TRUSTEE / "tcbInfo.json")  # FMSPC 00a06d080000
    now = datetime.datetime(2025, 11, 1, tzinfo=datetime.UTC)
    with pytest.raises(VerificationError, match="FMSPC 00a06d080000") as exc:
        verify_tdx_at_time(raw(SPR), now=now, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "tcb_info"


def test_stale_tcb_info_fails_freshness() -> None:
    info = TcbInfo.from_json(GO / "sample_tcbInfo_response")
    with pytest.raises(VerificationError, match="TCB info is valid from") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW, collateral=TdxCollateral(tcb_info=info))
    assert exc.value.check == "collateral_freshness"


# --- QE identity ----------------------------------------------------------------------


def test_trustee_qe_identity_matches_trustee_v5_quote() -> None:
    ident = QeIdentity.from_json(TRUSTEE / "enclaveIdentity.json")
    now = datetime.datetime(2025, 11, 1, tzinfo=datetime.UTC)
    claims = verify_tdx_at_time(raw(T5), now=now, collateral=TdxCollateral(qe_identity=ident))
    assert claims.fields["qe_identity_status"] == "UpToDate"


def test_qe_identity_wrong_mrsigner_fails() -> None:
    def edit(ident: dict[str, Any]) -> None:
        ident["mrsigner"] = "00" * 32

    ident = QeIdentity.from_json(
        _edited(GO / "sample_qeIdentity_response", "enclaveIdentity", edit)
    )
    with pytest.raises(VerificationError, match="QE MRSIGNER") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=TdxCollateral(qe_identity=ident))
    assert exc.value.check == "qe_identity"


def test_qe_identity_wrong_prodid_fails() -> None:
    def edit(ident: dict[str, Any]) -> None:
        ident["isvprodid"] = 1

    ident = QeIdentity.from_json(
        _edited(GO / "sample_qeIdentity_response", "enclaveIdentity", edit)
    )
    with pytest.raises(VerificationError, match="ISVPRODID 2 is not 1") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=TdxCollateral(qe_identity=ident))
    assert exc.value.check == "qe_identity"


# --- CRLs -----------------------------------------------------------------------------


def test_crls_current_and_not_revoking() -> None:
    col = TdxCollateral(
        root_crl=load_crl(GO / "rootcrl.der", what="root CRL"),
        pck_crl=load_crl(GO / "pckcrl", what="PCK CRL"),
    )
    claims = verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=col)
    crl = _check(claims, "crl")
    assert crl.passed is True and "root CA CRL and PCK CRL" in crl.detail


def test_stale_crl_fails() -> None:
    col = TdxCollateral(pck_crl=load_crl(GO / "pckcrl", what="PCK CRL"))
    with pytest.raises(VerificationError, match="not current") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW, collateral=col)
    assert exc.value.check == "crl"


def test_crl_from_wrong_issuer_fails() -> None:
    col = TdxCollateral(pck_crl=load_crl(GO / "rootcrl.der", what="PCK CRL"))
    with pytest.raises(VerificationError, match="issued by 'Intel SGX Root CA'") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=col)
    assert exc.value.check == "crl"


def test_crl_in_pem_and_hex_loads() -> None:
    der = (GO / "rootcrl.der").read_bytes()
    crl = x509.load_der_x509_crl(der)
    assert load_crl(crl.public_bytes(Encoding.PEM), what="x") == crl
    assert load_crl(der.hex().encode(), what="x") == crl
    with pytest.raises(EvidenceFormatError, match="not a CRL"):
        load_crl(b"garbage", what="root CRL")


def _ca(
    name: str, issuer: tuple[Any, x509.Name] | None = None, ca: bool = True
) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, issuer_name = issuer if issuer else (key, subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    return key, builder.sign(signer_key, hashes.SHA256())


def _crl(key: Any, issuer: x509.Certificate, revoked: list[int]) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
        .next_update(datetime.datetime(2024, 2, 1, tzinfo=datetime.UTC))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
            .build()
        )
    return builder.sign(key, hashes.SHA256())


def test_revoked_pck_leaf_fails_crl() -> None:
    # A locally made CA hierarchy: Intel's CAs cannot be made to revoke a vector's leaf.
    root_key, root = _ca("Test Root CA")
    inter_key, inter = _ca("Test PCK Platform CA", (root_key, root.subject))
    _, leaf = _ca("Test SGX PCK Certificate", (inter_key, inter.subject), ca=False)
    chain = PckChain(leaf=leaf, intermediate=inter, root=root)
    now = datetime.datetime(2024, 1, 15, tzinfo=datetime.UTC)
    ok = check_crls(
        chain,
        root_crl=_crl(root_key, root, []),
        pck_crl=_crl(inter_key, inter, [12345]),
        now=now,
    )
    assert ok.passed is True
    with pytest.raises(VerificationError, match="revoked by the PCK CRL") as exc:
        check_crls(
            chain, root_crl=None, pck_crl=_crl(inter_key, inter, [leaf.serial_number]), now=now
        )
    assert exc.value.check == "crl"
    with pytest.raises(VerificationError, match="revoked by the root CA CRL"):
        check_crls(
            chain, root_crl=_crl(root_key, root, [inter.serial_number]), pck_crl=None, now=now
        )
    # A CRL with the right issuer name but the wrong key.
    other_key, _ = _ca("Test PCK Platform CA")
    with pytest.raises(VerificationError, match="signature does not verify"):
        check_crls(chain, root_crl=None, pck_crl=_crl(other_key, inter, []), now=now)


# --- collateral signatures ------------------------------------------------------------


def _sign(key: Any, body: bytes) -> bytes:
    r, s = utils.decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_collateral_signature_verifies_with_a_supplied_chain() -> None:
    root_key, root = _ca("Test Root CA")
    signer_key, signer = _ca("Test TCB Signing", (root_key, root.subject), ca=False)
    now = datetime.datetime(2024, 1, 15, tzinfo=datetime.UTC)
    info = TcbInfo.from_json(GO / "sample_tcbInfo_response")
    good = _sign(signer_key, info.signed_body)
    check = verify_collateral_signatures(
        [signer, root], [("TCB info", info.signed_body, good)], root=root, now=now
    )
    assert check.passed is True and "TCB info" in check.detail
    with pytest.raises(VerificationError, match="TCB info signature does not verify") as exc:
        verify_collateral_signatures(
            [signer, root], [("TCB info", info.signed_body, info.signature)], root=root, now=now
        )
    assert exc.value.check == "collateral_signature"


def test_collateral_signing_chain_must_reach_intel_root() -> None:
    root_key, root = _ca("Intel SGX Root CA")
    _, signer = _ca("Intel SGX TCB Signing", (root_key, root.subject), ca=False)
    col = _go_collateral(tcb_signing_chain=(signer, root))
    with pytest.raises(VerificationError, match="does not chain") as exc:
        verify_tdx_at_time(raw(SPR), now=NOW_2023, collateral=col)
    assert exc.value.check == "collateral_signature"


def test_signed_body_is_the_exact_served_text() -> None:
    text = (GO / "sample_tcbInfo_response").read_text()
    info = TcbInfo.from_json(text)
    assert info.signed_body.decode() in text
    assert info.signed_body.startswith(b'{"id":"TDX"') and info.signed_body.endswith(b"}")
    assert json.loads(info.signed_body) == json.loads(text)["tcbInfo"]
    assert len(info.signature) == 64


# --- files ----------------------------------------------------------------------------


def test_from_files_and_missing_file() -> None:
    col = TdxCollateral.from_files(
        tcb_info=GO / "sample_tcbInfo_response",
        qe_identity=GO / "sample_qeIdentity_response",
        root_crl=GO / "rootcrl.der",
        pck_crl=GO / "pckcrl",
    )
    assert col.tcb_info is not None and col.tcb_info.fmspc.hex() == "50806f000000"
    assert col.qe_identity is not None and col.qe_identity.isvprodid == 2
    with pytest.raises(EvidenceFormatError, match="cannot read") as exc:
        TdxCollateral.from_files(tcb_info=GO / "no-such-file")
    assert exc.value.check == "collateral_format"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"signature": "00"}', 'expected an object with "tcbInfo"'),
        ('{"tcbInfo": {}, "signature": "' + "00" * 64 + '"}', "missing or bad field"),
    ],
)
def test_bad_tcb_info_is_a_format_error(text: str, message: str) -> None:
    with pytest.raises(EvidenceFormatError, match=message):
        TcbInfo.from_json(text)
