"""Intel TDX quote verification: raw quote (+ optional collateral) -> :class:`Claims`.

The verifier establishes facts and never decides trust: a debug TD, an out-of-date TCB
or an unexpected MRTD verify fine and are refused by policies
(:mod:`sealserve.attestation.tdx_policy` and the generic policies). What makes it
raise is evidence that cannot be trusted at all; each failure is a
:class:`VerificationError` whose ``check`` names the step:

==========================  ==========================================================
``quote_format``            (EvidenceFormatError) truncated, garbage, not TDX, ...
``validity_period``         a PCK chain certificate is not valid at ``now``
``pck_chain``               PCK leaf -> Platform/Processor CA -> pinned Intel root fails
``qe_report_signature``     the QE report is not signed by the PCK key
``qe_report_binding``       QE report_data[0:32] != SHA-256(attestation key || auth data)
``qe_identity``             the QE is not Intel's TD QE (vendor id, MRSIGNER, ISVPRODID;
                            with collateral also ATTRIBUTES/MISCSELECT and ISVSVN level)
``tcb_info``                TCB info is not TDX TCB info for this FMSPC / PCE-ID
``quote_signature``         header + TD report not signed by the attestation key
``crl``                     a CRL is foreign, badly signed, stale, or revokes the chain
``collateral_freshness``    TCB info / QE identity not current at ``now``
``collateral_signature``    a TCB-signing chain (-> pinned root) or a JSON signature fails
``tdx_module``              MRSIGNERSEAM / SEAMATTRIBUTES do not match the TCB info
``tcb_status``              no TCB level matches, or the TCB is Revoked
==========================  ==========================================================
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sealserve.attestation.claims import Check, Claims, Platform
from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.attestation.tdx_pck import (
    PckChain,
    PckExtension,
    intel_sgx_root_ca,
    load_pem_chain,
    pck_extension,
    verify_pck_chain,
    verify_raw_p256,
)
from sealserve.attestation.tdx_quote import INTEL_QE_VENDOR_ID, TdxQuote
from sealserve.attestation.tdx_tcb import evaluate_collateral
from sealserve.attestation.x509names import common_name
from sealserve.errors import EvidenceFormatError, VerificationError

# Intel's TD quoting enclave, as published in every TD_QE identity Intel signs: used
# when no QE identity collateral is given, so that a quote is never accepted from an
# enclave that is not Intel's QE (the collateral, when given, is checked as well).
INTEL_TD_QE_MRSIGNER = bytes.fromhex(
    "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
)
INTEL_TD_QE_ISVPRODID = 2

__all__ = ["TdxCollateral", "TdxQuote", "tdx_fields", "verify_tdx", "verify_tdx_at_time"]


def tdx_fields(quote: TdxQuote, chain: PckChain, pck: PckExtension) -> dict[str, Any]:
    """Every decoded field of a verified quote, JSON-friendly (bytes as lowercase hex).

    The names match ``tests/data/vectors/expected_fields.json``; ``tee_tcb_svn2`` and
    ``mrservicetd`` are present only for TD report 1.5 (quote v5, body type 3).
    """
    td = quote.td_report
    qe = quote.qe_report
    fields: dict[str, Any] = {
        "version": quote.header.version,
        "att_key_type": quote.header.att_key_type,
        "tee_type": f"{quote.header.tee_type:#x}",
        "qe_vendor_id": quote.header.qe_vendor_id.hex(),
        "tee_tcb_svn": td.tee_tcb_svn.hex(),
        "mrseam": td.mrseam.hex(),
        "seam_attributes": td.seam_attributes.hex(),
        "td_attributes": td.td_attributes.hex(),
        "td_debug": td.debug,
        "xfam": td.xfam.hex(),
        "mrtd": td.mrtd.hex(),
        "mrconfigid": td.mrconfigid.hex(),
        "mrowner": td.mrowner.hex(),
        "mrownerconfig": td.mrownerconfig.hex(),
        "rtmr": [r.hex() for r in td.rtmr],
        "report_data": td.report_data.hex(),
        "qe_isvprodid": qe.isvprodid,
        "qe_isvsvn": qe.isvsvn,
        "qe_mrsigner": qe.mrsigner.hex(),
        "pck_fmspc": pck.fmspc.hex(),
        "pck_issuer": common_name(chain.leaf.issuer),
        "pck_not_after": chain.leaf.not_valid_after_utc.isoformat(),
    }
    if td.tee_tcb_svn2 is not None and td.mrservicetd is not None:
        fields["tee_tcb_svn2"] = td.tee_tcb_svn2.hex()
        fields["mrservicetd"] = td.mrservicetd.hex()
    return fields


def verify_tdx_at_time(
    raw: bytes, *, now: datetime.datetime, collateral: TdxCollateral | None = None
) -> Claims:
    """Verify a TDX quote (v4 or v5) as of ``now`` and return its claims.

    Without ``collateral`` the quote's authenticity is established (chain to the pinned
    Intel SGX Root CA, QE report, binding, quote signature) but not its TCB status;
    ``claims.checks`` then says so. With collateral, CRLs, QE identity and TCB status
    are evaluated as far as the supplied parts allow, and ``fields["tcb_status"]`` is
    set when TCB info was given.

    Raises EvidenceFormatError for unparseable input and VerificationError (``check``
    names the failed step; see the module docstring) for untrustworthy evidence.
    Raises ValueError if ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(datetime.UTC)
    # 1. Parse: structure, version 4/5, TDX, ECDSA P-256, certification data 6 -> 5.
    quote = TdxQuote.from_bytes(raw)
    # 2. PCK leaf -> PCK Platform/Processor CA -> pinned Intel SGX Root CA, valid at now.
    chain = verify_pck_chain(quote.pck_chain_pem, now=now)
    pck = pck_extension(chain.leaf)
    checks = [
        Check("validity_period", True, f"PCK chain valid at {now.isoformat()}"),
        Check(
            "pck_chain",
            True,
            f"PCK leaf <- {common_name(chain.intermediate.subject)} <- Intel SGX Root CA (pinned)",
        ),
    ]
    # 3. The QE report is signed by the PCK key.
    pck_key = chain.leaf.public_key()
    if not verify_raw_p256(pck_key, quote.qe_report_signature, quote.qe_report.raw):
        raise VerificationError(
            "qe_report_signature: the QE report is not signed by the PCK certificate's key",
            check="qe_report_signature",
        )
    checks.append(Check("qe_report_signature", True, "QE report signed by the PCK key"))
    # 4. The QE vouches for the attestation key: report_data = SHA-256(key || auth data).
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    if not hmac.compare_digest(binding, quote.qe_report.report_data[:32]):
        raise VerificationError(
            "qe_report_binding: QE report_data does not equal SHA-256(attestation key || "
            "QE authentication data)",
            check="qe_report_binding",
        )
    checks.append(Check("qe_report_binding", True, "attestation key bound by the QE report"))
    # 4b. The QE is Intel's TD QE (the collateral's QE identity adds its TCB level).
    checks.append(check_intel_qe(quote))
    # 5. The attestation key signed the header and TD report.
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key
        )
    except ValueError as exc:
        raise VerificationError(
            "quote_signature: the attestation key is not a P-256 point", check="quote_signature"
        ) from exc
    if not verify_raw_p256(att_key, quote.quote_signature, quote.signed_data):
        raise VerificationError(
            "quote_signature: the quote (header and TD report) is not signed by the "
            "attestation key",
            check="quote_signature",
        )
    checks.append(
        Check("quote_signature", True, "header and TD report signed by the attestation key")
    )
    fields = tdx_fields(quote, chain, pck)
    # 6. Collateral: CRLs, QE identity, TCB status (each only as far as supplied).
    if quote.trailing:
        checks.append(
            Check("trailing_bytes", None, f"{quote.trailing} bytes after the signature data "
                  "(covered by no signature) ignored")
        )  # fmt: skip
    if collateral is None:
        checks.append(Check("crl", None, "not checked: no collateral supplied"))
        checks.append(Check("collateral_signature", None, "no collateral supplied"))
        checks.append(Check("tcb_status", None, "not evaluated: no collateral supplied"))
    else:
        extra_fields, extra_checks = evaluate_collateral(
            collateral, quote, chain, pck, root=intel_sgx_root_ca(), now=now
        )
        fields.update(extra_fields)
        checks.extend(extra_checks)
    td = quote.td_report
    return Claims(
        platform=Platform.TDX,
        report_data=td.report_data,
        debug=td.debug,
        measurements={
            "mrtd": td.mrtd,
            "rtmr0": td.rtmr[0],
            "rtmr1": td.rtmr[1],
            "rtmr2": td.rtmr[2],
            "rtmr3": td.rtmr[3],
        },
        fields=fields,
        checks=tuple(checks),
        extra={"mrsignerseam": td.mrsignerseam.hex(), "body_type": quote.body_type},
    )


def quote_fmspc(raw: bytes) -> bytes:
    """The FMSPC in a quote's PCK certificate (unverified: to pick collateral by).

    Raises EvidenceFormatError when the quote or its PCK certificate cannot be parsed.
    """
    quote = TdxQuote.from_bytes(raw)
    certs = load_pem_chain(quote.pck_chain_pem, what="PCK certificate chain")
    if not certs:
        raise EvidenceFormatError("TDX quote: no PCK certificate", check="quote_format")
    return pck_extension(certs[0]).fmspc


def check_intel_qe(quote: TdxQuote) -> Check:
    """The quote's QE is Intel's TD QE (vendor id, MRSIGNER, ISVPRODID): checked with or
    without QE identity collateral. Raises VerificationError (``check="qe_identity"``)."""
    qe = quote.qe_report
    problems = []
    if quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        problems.append(f"QE vendor id {quote.header.qe_vendor_id.hex()} is not Intel's")
    if not hmac.compare_digest(qe.mrsigner, INTEL_TD_QE_MRSIGNER):
        problems.append(f"QE MRSIGNER {qe.mrsigner.hex()[:16]}... is not Intel's")
    if qe.isvprodid != INTEL_TD_QE_ISVPRODID:
        problems.append(f"QE ISVPRODID {qe.isvprodid} is not the TD QE's (2)")
    if problems:
        raise VerificationError(
            "qe_identity: the quoting enclave is not Intel's TD QE: " + "; ".join(problems),
            check="qe_identity",
        )
    return Check("qe_identity", True, "Intel TD QE (vendor id, MRSIGNER, ISVPRODID 2)")


def verify_tdx(raw: bytes, *, collateral: TdxCollateral | None = None) -> Claims:
    """:func:`verify_tdx_at_time` at the current time. Same errors."""
    return verify_tdx_at_time(raw, now=datetime.datetime.now(datetime.UTC), collateral=collateral)
