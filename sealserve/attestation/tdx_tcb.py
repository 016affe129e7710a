"""Checks of a TDX quote against its collateral (QVL section numbers in comments):
CRLs, QE identity, TDX module identity, TCB level matching and status convergence,
and the collateral's own signatures when the TCB-signing chain is supplied.

Over 400 lines: one QVL walk, kept whole so its numbered sections read in order.

The objects checked here are parsed by :mod:`sealserve.attestation.tdx_collateral`;
see its docstring for the algorithm and its limits.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sealserve.attestation.claims import Check
from sealserve.attestation.tdx_collateral import (
    CONFIG_AND_SW,
    CONFIG_NEEDED,
    CONFIG_STATUSES,
    OUT_OF_DATE,
    OUT_OF_DATE_CONFIG,
    RELAUNCH,
    RELAUNCH_CONFIG,
    REVOKED,
    SW_HARDENING,
    UP_TO_DATE,
    ModuleIdentity,
    QeIdentity,
    TcbInfo,
    TdxCollateral,
)
from sealserve.attestation.tdx_pck import (
    PckChain,
    PckExtension,
    check_validity,
    verify_chain,
    verify_raw_p256,
)
from sealserve.attestation.tdx_quote import BODY_TYPE_TD15, QeReport, TdxQuote
from sealserve.attestation.x509names import common_name
from sealserve.errors import VerificationError


def verify_collateral_signatures(
    chain: Sequence[x509.Certificate],
    signed: Sequence[tuple[str, bytes, bytes]],
    *,
    root: x509.Certificate,
    now: datetime.datetime,
) -> Check:
    """Validate the TCB-signing chain up to ``root`` and each ``(name, body, r||s)``
    against its leaf. Raises VerificationError (``check="collateral_signature"``)."""
    if not chain:
        raise VerificationError(
            "collateral_signature: the TCB signing chain is empty", check="collateral_signature"
        )
    leaf = chain[0]
    intermediates = [c for c in chain[1:] if c != root]
    try:
        check_validity([leaf, *intermediates], now=now, what="TCB signing")
    except VerificationError as exc:
        raise VerificationError(
            f"collateral_signature: {exc.message}", check="collateral_signature"
        ) from exc
    verify_chain(leaf, intermediates, root=root, now=now, check="collateral_signature")
    for name, body, signature in signed:
        if not verify_raw_p256(leaf.public_key(), signature, body):
            raise VerificationError(
                f"collateral_signature: the {name} signature does not verify with "
                f"'{common_name(leaf.subject)}'",
                check="collateral_signature",
            )
    names = ", ".join(n for n, _, _ in signed)
    return Check("collateral_signature", True, f"{names} signed by {common_name(leaf.subject)}")


def _check_one_crl(
    crl: x509.CertificateRevocationList,
    *,
    issuer: x509.Certificate,
    subject: x509.Certificate,
    now: datetime.datetime,
    what: str,
) -> None:
    if crl.issuer != issuer.subject:
        raise VerificationError(
            f"crl: the {what} is issued by '{common_name(crl.issuer)}', expected "
            f"'{common_name(issuer.subject)}'",
            check="crl",
        )
    key = issuer.public_key()
    # Intel's CAs are all ECDSA P-256; anything else cannot have signed an Intel CRL.
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise VerificationError(
            f"crl: the {what} signature does not verify with '{common_name(issuer.subject)}'",
            check="crl",
        )
    next_update = crl.next_update_utc
    if now < crl.last_update_utc or next_update is None or now > next_update:
        raise VerificationError(
            f"crl: the {what} is not current at {now.isoformat()} (thisUpdate "
            f"{crl.last_update_utc.isoformat()}, nextUpdate "
            f"{next_update.isoformat() if next_update else 'absent'})",
            check="crl",
        )
    if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
        raise VerificationError(
            f"crl: certificate '{common_name(subject.subject)}' (serial "
            f"{subject.serial_number:x}) is revoked by the {what}",
            check="crl",
        )


def check_crls(
    chain: PckChain,
    *,
    root_crl: x509.CertificateRevocationList | None,
    pck_crl: x509.CertificateRevocationList | None,
    now: datetime.datetime,
) -> Check:
    """Check the PCK intermediate against the root CA CRL and the PCK leaf against the
    PCK CRL. Raises VerificationError (``check="crl"``) if a CRL is foreign, badly
    signed, not current at ``now``, or lists the certificate."""
    done = []
    if root_crl is not None:
        _check_one_crl(
            root_crl, issuer=chain.root, subject=chain.intermediate, now=now, what="root CA CRL"
        )
        done.append("root CA CRL")
    if pck_crl is not None:
        _check_one_crl(
            pck_crl, issuer=chain.intermediate, subject=chain.leaf, now=now, what="PCK CRL"
        )
        done.append("PCK CRL")
    missing = [n for n, c in (("root CA CRL", root_crl), ("PCK CRL", pck_crl)) if c is None]
    if missing:
        detail = "not revoked per " + ", ".join(done) if done else ""
        gap = "not checked: no " + " and no ".join(missing) + " supplied"
        return Check("crl", None, "; ".join(p for p in (detail, gap) if p))
    return Check("crl", True, "not revoked per root CA CRL and PCK CRL")


def _fresh(
    issue: datetime.datetime, next_update: datetime.datetime, now: datetime.datetime, what: str
) -> None:
    if not issue <= now <= next_update:
        raise VerificationError(
            f"collateral_freshness: the {what} is valid from {issue.isoformat()} to "
            f"{next_update.isoformat()}, not at {now.isoformat()}",
            check="collateral_freshness",
        )


def evaluate_qe_identity(identity: QeIdentity, qe: QeReport) -> str:
    """QVL 4.1.2.4.14-15: match the QE report against the QE identity.

    Returns the QE's TCB status ("UpToDate", "OutOfDate", "Revoked"); raises
    VerificationError (``check="qe_identity"``) on a mismatch or an unsupported ISVSVN.
    """

    def fail(message: str) -> VerificationError:
        return VerificationError(f"qe_identity: {message}", check="qe_identity")

    if identity.id != "TD_QE" or identity.version != 2:
        raise fail(f"identity is {identity.id!r} v{identity.version}, expected 'TD_QE' v2")
    if qe.miscselect & identity.miscselect_mask != identity.miscselect:
        raise fail("QE MISCSELECT does not match the identity")
    masked = bytes(a & m for a, m in zip(qe.attributes, identity.attributes_mask, strict=True))
    if masked != identity.attributes:
        raise fail("QE ATTRIBUTES do not match the identity")
    if qe.mrsigner != identity.mrsigner:
        raise fail(f"QE MRSIGNER {qe.mrsigner.hex()} is not {identity.mrsigner.hex()}")
    if qe.isvprodid != identity.isvprodid:
        raise fail(f"QE ISVPRODID {qe.isvprodid} is not {identity.isvprodid}")
    for level in identity.levels:
        if qe.isvsvn >= level.isvsvn:
            return level.status
    raise fail(f"QE ISVSVN {qe.isvsvn} is below every TCB level (not supported)")


@dataclass(frozen=True)
class TcbEvaluation:
    """The outcome of TCB evaluation: the converged status and what it came from."""

    status: str
    tcb_date: str
    advisory_ids: tuple[str, ...]
    module_status: str


def _find_module(info: TcbInfo, version: int) -> ModuleIdentity:
    wanted = f"TDX_{version:02X}"
    for module in info.module_identities:
        if module.id == wanted:
            return module
    raise VerificationError(
        f"tdx_module: TCB info has no module identity {wanted} for TDX module version {version}",
        check="tdx_module",
    )


def _converge_module(level_status: str, module_status: str) -> str:
    if module_status == OUT_OF_DATE:
        if level_status in (UP_TO_DATE, SW_HARDENING):
            return OUT_OF_DATE
        if level_status in (CONFIG_NEEDED, CONFIG_AND_SW):
            return OUT_OF_DATE_CONFIG
    if module_status == REVOKED:
        return REVOKED
    return level_status


def _converge_qe(status: str, qe_status: str) -> str:
    if qe_status == OUT_OF_DATE:
        if status in (UP_TO_DATE, SW_HARDENING):
            return OUT_OF_DATE
        if status in (CONFIG_NEEDED, CONFIG_AND_SW):
            return OUT_OF_DATE_CONFIG
    if qe_status == REVOKED:
        return REVOKED
    return status


def _relaunch(
    quote: TdxQuote,
    info: TcbInfo,
    sgx_status: str,
    tdx_status: str,
    module_status: str,
    qe_status: str | None,
) -> str:
    """QVL 4.1.2.4.17.4.3: a TD on an out-of-date module whose platform has since been
    updated (TEE_TCB_SVN2 at the latest level) only needs relaunching."""
    svn2 = quote.td_report.tee_tcb_svn2
    if svn2 is None or not info.levels:
        return tdx_status
    if qe_status in (OUT_OF_DATE, REVOKED):
        return tdx_status
    if sgx_status not in (UP_TO_DATE, SW_HARDENING, CONFIG_NEEDED, CONFIG_AND_SW):
        return tdx_status
    if tdx_status not in (OUT_OF_DATE, OUT_OF_DATE_CONFIG) or module_status != OUT_OF_DATE:
        return tdx_status
    latest = info.levels[0]
    if svn2[1] == 0:
        current = svn2[0] >= latest.tdx_components[0]
    else:
        module2 = _find_module(info, svn2[1])
        if not module2.levels:
            raise VerificationError(
                f"tcb_status: module identity {module2.id} has no TCB levels", check="tcb_status"
            )
        current = svn2[0] >= module2.levels[0].isvsvn
    if current and svn2[2] >= latest.tdx_components[2]:
        if sgx_status in CONFIG_STATUSES or tdx_status in CONFIG_STATUSES:
            return RELAUNCH_CONFIG
        return RELAUNCH
    return tdx_status


def evaluate_tcb(
    info: TcbInfo, quote: TdxQuote, pck: PckExtension, qe_status: str | None
) -> TcbEvaluation:
    """QVL 4.1.2.4.9-11 and 4.1.2.4.17: the TCB status of this TD on this platform.

    Raises VerificationError: ``check="tcb_info"`` when the TCB info is not TDX TCB info
    for this FMSPC/PCE-ID, ``check="tdx_module"`` when the TDX module identity does not
    match, ``check="tcb_status"`` when no TCB level matches or the status is Revoked.
    """
    report = quote.td_report
    svn = report.tee_tcb_svn
    if info.id != "TDX" or info.version < 3:
        raise VerificationError(
            f"tcb_info: TCB info is {info.id!r} v{info.version}, expected 'TDX' v3",
            check="tcb_info",
        )
    if info.fmspc != pck.fmspc or info.pceid != pck.pceid:
        raise VerificationError(
            f"tcb_info: TCB info is for FMSPC {info.fmspc.hex()} PCE-ID {info.pceid.hex()}, "
            f"the PCK certificate has FMSPC {pck.fmspc.hex()} PCE-ID {pck.pceid.hex()}",
            check="tcb_info",
        )
    # 4.1.2.4.11: the TDX module is Intel's (MRSIGNERSEAM) with the expected attributes.
    module = info.tdx_module if svn[1] == 0 else _find_module(info, svn[1])
    if report.mrsignerseam != module.mrsigner:
        raise VerificationError(
            f"tdx_module: MRSIGNERSEAM {report.mrsignerseam.hex()} is not {module.mrsigner.hex()}",
            check="tdx_module",
        )
    if any(report.seam_attributes) or report.seam_attributes != module.attributes:
        raise VerificationError(
            f"tdx_module: SEAMATTRIBUTES {report.seam_attributes.hex()} are not zero / "
            f"{module.attributes.hex()}",
            check="tdx_module",
        )
    # 4.1.2.4.17.1-3: first level the platform (PCK) and the TDX TCB both meet.
    sgx_level = tdx_level = None
    start = 2 if svn[1] > 0 else 0
    for level in info.levels:
        meets_sgx = all(
            have >= need
            for have, need in zip(pck.sgx_tcb_components, level.sgx_components, strict=True)
        )
        if not (meets_sgx and pck.pcesvn >= level.pcesvn):
            continue
        if sgx_level is None:
            sgx_level = level
        if all(svn[i] >= level.tdx_components[i] for i in range(start, 16)):
            tdx_level = level
            break
    if sgx_level is None or tdx_level is None:
        part = "platform (PCK SGX TCB)" if sgx_level is None else "TDX TCB (TEE_TCB_SVN)"
        raise VerificationError(
            f"tcb_status: TCB not supported: no TCB level matches the {part}", check="tcb_status"
        )
    # 4.1.2.4.17.4.1: the module's own TCB level.
    module_status = UP_TO_DATE
    advisories = list(tdx_level.advisory_ids)
    if svn[1] > 0:
        for mlevel in module.levels:
            if svn[0] >= mlevel.isvsvn:
                module_status = mlevel.status
                advisories.extend(mlevel.advisory_ids)
                break
        else:
            raise VerificationError(
                f"tcb_status: TDX module ISVSVN {svn[0]} is below every level of {module.id}",
                check="tcb_status",
            )
    status = _converge_module(tdx_level.status, module_status)
    if status != REVOKED:
        if quote.body_type == BODY_TYPE_TD15:
            status = _relaunch(quote, info, sgx_level.status, status, module_status, qe_status)
        if qe_status is not None:
            status = _converge_qe(status, qe_status)
    if status == REVOKED:
        raise VerificationError("tcb_status: the platform's TCB is Revoked", check="tcb_status")
    return TcbEvaluation(
        status=status,
        tcb_date=tdx_level.tcb_date,
        advisory_ids=tuple(sorted(set(advisories))),
        module_status=module_status,
    )


TCB_SIGNING_CN = "Intel SGX TCB Signing"


def _signing_leaf(
    chain: Sequence[x509.Certificate] | None,
    what: str,
    *,
    root: x509.Certificate,
    root_crl: x509.CertificateRevocationList | None,
    now: datetime.datetime,
) -> x509.Certificate | None:
    """Validate a TCB-signing chain (Intel SGX TCB Signing -> pinned root, valid at
    ``now``, not revoked by the root CA CRL when one is given); None when absent."""
    if chain is None:
        return None
    if not chain or common_name(chain[0].subject) != TCB_SIGNING_CN:
        found = common_name(chain[0].subject) if chain else "nothing"
        raise VerificationError(
            f"collateral_signature: the {what} issuer chain starts with '{found}', "
            f"expected '{TCB_SIGNING_CN}'",
            check="collateral_signature",
        )
    verify_collateral_signatures(chain, [], root=root, now=now)
    if root_crl is not None:
        _check_one_crl(root_crl, issuer=root, subject=chain[0], now=now, what="root CA CRL")
    return chain[0]


def _verify_signed(leaf: x509.Certificate, name: str, body: bytes, signature: bytes) -> None:
    if not verify_raw_p256(leaf.public_key(), signature, body):
        raise VerificationError(
            f"collateral_signature: the {name} signature does not verify with "
            f"'{common_name(leaf.subject)}' (edited or foreign collateral)",
            check="collateral_signature",
        )


def evaluate_collateral(
    collateral: TdxCollateral,
    quote: TdxQuote,
    chain: PckChain,
    pck: PckExtension,
    *,
    root: x509.Certificate,
    now: datetime.datetime,
) -> tuple[dict[str, Any], list[Check]]:
    """Run every collateral check this collateral allows; return the extra claim
    fields and the checks. Raises VerificationError naming the failed check.

    Order: 1 the CRLs (both issuers, windows, revocation of the PCK chain); 2 each JSON
    document's signature against its issuer chain (TCB Signing -> pinned root), before
    anything in it is believed; 3 validity windows; 4 the QE identity; 5 the FMSPC and
    the TCB level. ``fields["collateral_verified"]`` is True only when every part was
    present and verified: TCB-status rules refuse otherwise.
    """
    fields: dict[str, Any] = {}
    # 1. CRLs.
    checks: list[Check] = [
        check_crls(chain, root_crl=collateral.root_crl, pck_crl=collateral.pck_crl, now=now)
    ]
    # 2. Signatures first: nothing in an unsigned document is read as a fact below.
    tcb_leaf = _signing_leaf(
        collateral.tcb_signing_chain, "TCB info", root=root, root_crl=collateral.root_crl, now=now
    )
    qe_chain = collateral.qe_identity_signing_chain or collateral.tcb_signing_chain
    if qe_chain == collateral.tcb_signing_chain:  # PCS serves one chain for both
        qe_leaf = tcb_leaf
    else:
        qe_leaf = _signing_leaf(
            qe_chain, "QE identity", root=root, root_crl=collateral.root_crl, now=now
        )
    signed: list[str] = []
    unsigned: list[str] = []
    if collateral.tcb_info is not None:
        info = collateral.tcb_info
        if tcb_leaf is None:
            unsigned.append("TCB info")
        else:
            _verify_signed(tcb_leaf, "TCB info", info.signed_body, info.signature)
            signed.append("TCB info")
    if collateral.qe_identity is not None:
        ident = collateral.qe_identity
        if qe_leaf is None:
            unsigned.append("QE identity")
        else:
            _verify_signed(qe_leaf, "QE identity", ident.signed_body, ident.signature)
            signed.append("QE identity")
    if unsigned:
        checks.append(
            Check(
                "collateral_signature",
                None,
                f"not verified: no issuer chain for {', '.join(unsigned)}"
                + (f"; {', '.join(signed)} signed by {TCB_SIGNING_CN}" if signed else ""),
            )
        )
    elif signed:
        checks.append(
            Check(
                "collateral_signature",
                True,
                f"{', '.join(signed)} signed by {TCB_SIGNING_CN} <- Intel SGX Root CA (pinned)",
            )
        )
    # 3-4. QE identity: window, then the QE against it.
    qe_status = None
    if collateral.qe_identity is not None:
        ident = collateral.qe_identity
        _fresh(ident.issue_date, ident.next_update, now, "QE identity")
        qe_status = evaluate_qe_identity(ident, quote.qe_report)
        fields["qe_identity_status"] = qe_status
        checks.append(Check("qe_identity", True, f"TD_QE identity matched, status {qe_status}"))
    # 3, 5. TCB info: window, FMSPC, TCB level.
    if collateral.tcb_info is not None:
        info = collateral.tcb_info
        _fresh(info.issue_date, info.next_update, now, "TCB info")
        result = evaluate_tcb(info, quote, pck, qe_status)
        fields["tcb_status"] = result.status
        fields["tcb_date"] = result.tcb_date
        fields["tcb_advisory_ids"] = list(result.advisory_ids)
        fields["tcb_evaluation_data_number"] = info.tcb_evaluation_data_number
        checks.append(Check("tcb_status", True, f"FMSPC {info.fmspc.hex()}: {result.status}"))
    else:
        checks.append(Check("tcb_status", None, "not evaluated: no TCB info supplied"))
    fields["collateral_verified"] = collateral.complete and not unsigned
    return fields, checks
