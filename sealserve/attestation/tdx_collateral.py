"""Intel DCAP collateral for TDX quotes: TCB Info (v3, id "TDX"), QE Identity (v2, id
"TD_QE"), the root CA CRL and the PCK CRL, and the TCB-signing chain that signs the JSON.

Collateral comes from files (what Intel PCS or a PCCS returned); this module never
fetches anything. The TCB evaluation follows Intel's Quote Verification Library
(QVL, section numbers of its design document in comments):

* 4.1.2.4.11  TDX module identity: MRSIGNERSEAM / SEAMATTRIBUTES against ``tdxModule``,
  or against ``tdxModuleIdentities["TDX_%02X" % TEE_TCB_SVN[1]]`` when the module's
  major version (TEE_TCB_SVN[1]) is non-zero;
* 4.1.2.4.15  QE identity: MISCSELECT/ATTRIBUTES under their masks, MRSIGNER,
  ISVPRODID, and the QE ISVSVN's TCB level;
* 4.1.2.4.17  TCB level: the first level (in Intel's order) whose 16 SGX component SVNs
  and PCESVN are <= the PCK certificate's, and whose TDX component SVNs are <=
  TEE_TCB_SVN (bytes 0 and 1 skipped when the module version is non-zero, since the
  module identity covers them); its status is converged with the module status, the
  TD-relaunch rule for TD report 1.5 (TEE_TCB_SVN2), and the QE identity status.

Limits: the TCB-signing certificate is not derivable from the quote; without it the JSON
signatures cannot be checked, and the result says so (``collateral_signature``,
``passed=None``). Levels are taken in the order Intel publishes them (newest first).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from sealserve.attestation.claims import Check
from sealserve.attestation.tdx_pck import (
    PckChain,
    PckExtension,
    check_validity,
    common_name,
    load_pem_chain,
    verify_chain,
)
from sealserve.attestation.tdx_quote import BODY_TYPE_TD15, QeReport, TdxQuote
from sealserve.errors import EvidenceFormatError, VerificationError

UP_TO_DATE = "UpToDate"
SW_HARDENING = "SWHardeningNeeded"
CONFIG_NEEDED = "ConfigurationNeeded"
CONFIG_AND_SW = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIG = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
RELAUNCH = "TDRelaunchAdvised"
RELAUNCH_CONFIG = "TDRelaunchAdvisedConfigurationNeeded"
TCB_LEVEL_STATUSES = frozenset(
    {
        UP_TO_DATE,
        SW_HARDENING,
        CONFIG_NEEDED,
        CONFIG_AND_SW,
        OUT_OF_DATE,
        OUT_OF_DATE_CONFIG,
        REVOKED,
    }
)
#: Every value ``fields["tcb_status"]`` can take (Revoked raises instead).
TCB_STATUSES = TCB_LEVEL_STATUSES | {RELAUNCH, RELAUNCH_CONFIG}
_CONFIG_STATUSES = frozenset({CONFIG_NEEDED, OUT_OF_DATE_CONFIG, CONFIG_AND_SW, RELAUNCH_CONFIG})


def _fmt(what: str, message: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"{what}: {message}", check="collateral_format")


def _parse_time(value: Any, what: str) -> datetime.datetime:
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise _fmt(what, f"bad timestamp {value!r}") from exc
    if parsed.tzinfo is None:
        raise _fmt(what, f"timestamp {value!r} has no time zone")
    return parsed


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    try:
        out = bytes.fromhex(str(value))
    except ValueError as exc:
        raise _fmt(what, f"bad hex {value!r}") from exc
    if size is not None and len(out) != size:
        raise _fmt(what, f"expected {size} bytes, got {len(out)}")
    return out


def _signed_body(text: str, key: str, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """Split a PCS response ``{"<key>": {...}, "signature": "<hex>"}`` into the parsed
    object, the exact bytes that were signed (the raw text of the object) and the
    64-byte r||s signature."""
    try:
        top = json.loads(text)
    except ValueError as exc:
        raise _fmt(what, f"not JSON ({exc})") from exc
    if not isinstance(top, dict) or not isinstance(top.get(key), dict):
        raise _fmt(what, f'expected an object with "{key}" and "signature"')
    # Intel signs the object's bytes exactly as served; re-serializing would not match.
    start = text.find(f'"{key}"')
    colon = text.find(":", start)
    begin = colon + 1
    while begin < len(text) and text[begin] in " \t\r\n":
        begin += 1
    try:
        _, end = json.JSONDecoder().raw_decode(text, begin)
    except ValueError as exc:
        raise _fmt(what, f"cannot locate the signed body ({exc})") from exc
    signature = _hex(top.get("signature", ""), f"{what} signature", 64)
    return top[key], text[begin:end].encode(), signature


def _read_text(source: str | bytes | Path, what: str) -> str:
    if isinstance(source, Path):
        source = source.read_bytes()
    if isinstance(source, bytes):
        try:
            return source.decode()
        except UnicodeDecodeError as exc:
            raise _fmt(what, "not UTF-8") from exc
    return source


@dataclass(frozen=True)
class TcbLevel:
    """One entry of TCB Info ``tcbLevels``."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleLevel:
    """One TCB level of a TDX module identity (by module ISVSVN = TEE_TCB_SVN[0])."""

    isvsvn: int
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleIdentity:
    """``tdxModule`` or one of ``tdxModuleIdentities``."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[ModuleLevel, ...] = ()


def _advisories(obj: Mapping[str, Any]) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fmt("TCB info", "advisoryIDs must be a list of strings")
    return tuple(ids)


def _status(value: Any, what: str) -> str:
    if value not in TCB_LEVEL_STATUSES:
        raise _fmt(what, f"unknown tcbStatus {value!r}")
    return str(value)


def _module(obj: Any, what: str) -> ModuleIdentity:
    if not isinstance(obj, dict):
        raise _fmt("TCB info", f"{what} is not an object")
    levels = []
    for lv in obj.get("tcbLevels", []):
        try:
            levels.append(
                ModuleLevel(
                    isvsvn=int(lv["tcb"]["isvsvn"]),
                    tcb_date=str(lv["tcbDate"]),
                    status=_status(lv["tcbStatus"], "TCB info"),
                    advisory_ids=_advisories(lv),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _fmt("TCB info", f"bad {what} TCB level ({exc})") from exc
    return ModuleIdentity(
        id=str(obj.get("id", "")).upper(),
        mrsigner=_hex(obj.get("mrsigner"), f"{what} mrsigner", 48),
        attributes=_hex(obj.get("attributes"), f"{what} attributes", 8),
        attributes_mask=_hex(obj.get("attributesMask"), f"{what} attributesMask", 8),
        levels=tuple(levels),
    )


@dataclass(frozen=True)
class TcbInfo:
    """TDX TCB Info (version 3), with the raw signed body and its signature."""

    version: int
    id: str
    fmspc: bytes
    pceid: bytes
    issue_date: datetime.datetime
    next_update: datetime.datetime
    tcb_evaluation_data_number: int
    tdx_module: ModuleIdentity
    module_identities: tuple[ModuleIdentity, ...]
    levels: tuple[TcbLevel, ...]
    signed_body: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @classmethod
    def from_json(cls, source: str | bytes | Path) -> TcbInfo:
        """Parse a PCS ``/tdx/certification/v4/tcb`` response body (or a file holding
        it). Raises EvidenceFormatError (``check="collateral_format"``)."""
        text = _read_text(source, "TCB info")
        info, body, signature = _signed_body(text, "tcbInfo", "TCB info")
        try:
            levels = tuple(
                TcbLevel(
                    sgx_components=tuple(int(c["svn"]) for c in lv["tcb"]["sgxtcbcomponents"]),
                    pcesvn=int(lv["tcb"]["pcesvn"]),
                    tdx_components=tuple(int(c["svn"]) for c in lv["tcb"]["tdxtcbcomponents"]),
                    tcb_date=str(lv["tcbDate"]),
                    status=_status(lv["tcbStatus"], "TCB info"),
                    advisory_ids=_advisories(lv),
                )
                for lv in info["tcbLevels"]
            )
            version = int(info["version"])
            number = int(info["tcbEvaluationDataNumber"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fmt("TCB info", f"missing or bad field ({exc})") from exc
        for lv in levels:
            if len(lv.sgx_components) != 16 or len(lv.tdx_components) != 16:
                raise _fmt("TCB info", "each TCB level needs 16 SGX and 16 TDX components")
        if "tdxModule" not in info:
            raise _fmt("TCB info", "no tdxModule: not a TDX TCB info")
        return cls(
            version=version,
            id=str(info.get("id", "")),
            fmspc=_hex(info.get("fmspc"), "TCB info fmspc", 6),
            pceid=_hex(info.get("pceId"), "TCB info pceId", 2),
            issue_date=_parse_time(info.get("issueDate"), "TCB info issueDate"),
            next_update=_parse_time(info.get("nextUpdate"), "TCB info nextUpdate"),
            tcb_evaluation_data_number=number,
            tdx_module=_module(info["tdxModule"], "tdxModule"),
            module_identities=tuple(
                _module(m, "tdxModuleIdentities") for m in info.get("tdxModuleIdentities", [])
            ),
            levels=levels,
            signed_body=body,
            signature=signature,
        )


@dataclass(frozen=True)
class QeIdentity:
    """TD QE Identity (version 2, id "TD_QE"), with the raw signed body and signature."""

    version: int
    id: str
    issue_date: datetime.datetime
    next_update: datetime.datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[ModuleLevel, ...]
    signed_body: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @classmethod
    def from_json(cls, source: str | bytes | Path) -> QeIdentity:
        """Parse a PCS ``/tdx/certification/v4/qe/identity`` response body (or a file).
        Raises EvidenceFormatError (``check="collateral_format"``)."""
        text = _read_text(source, "QE identity")
        ident, body, signature = _signed_body(text, "enclaveIdentity", "QE identity")
        try:
            levels = tuple(
                ModuleLevel(
                    isvsvn=int(lv["tcb"]["isvsvn"]),
                    tcb_date=str(lv["tcbDate"]),
                    status=_status(lv["tcbStatus"], "QE identity"),
                    advisory_ids=_advisories(lv),
                )
                for lv in ident["tcbLevels"]
            )
            return cls(
                version=int(ident["version"]),
                id=str(ident["id"]),
                issue_date=_parse_time(ident["issueDate"], "QE identity issueDate"),
                next_update=_parse_time(ident["nextUpdate"], "QE identity nextUpdate"),
                miscselect=int.from_bytes(_hex(ident["miscselect"], "miscselect", 4), "big"),
                miscselect_mask=int.from_bytes(
                    _hex(ident["miscselectMask"], "miscselectMask", 4), "big"
                ),
                attributes=_hex(ident["attributes"], "QE identity attributes", 16),
                attributes_mask=_hex(ident["attributesMask"], "QE identity attributesMask", 16),
                mrsigner=_hex(ident["mrsigner"], "QE identity mrsigner", 32),
                isvprodid=int(ident["isvprodid"]),
                levels=levels,
                signed_body=body,
                signature=signature,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _fmt("QE identity", f"missing or bad field ({exc})") from exc


def load_crl(source: bytes | Path, *, what: str) -> x509.CertificateRevocationList:
    """Load a CRL given as DER, PEM or hex-encoded DER (PCCS serves all three).

    Raises EvidenceFormatError (``check="collateral_format"``).
    """
    data = source.read_bytes() if isinstance(source, Path) else source
    stripped = data.strip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(stripped)
        if stripped[:2] in (b"30", b"30".upper()) and all(
            c in b"0123456789abcdefABCDEF" for c in stripped
        ):
            return x509.load_der_x509_crl(bytes.fromhex(stripped.decode()))
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise _fmt(what, f"not a CRL ({exc})") from exc


@dataclass(frozen=True)
class TdxCollateral:
    """Collateral for TDX verification; every part is optional.

    ``tcb_signing_chain`` is the PEM chain from PCS's ``TCB-Info-Issuer-Chain`` header
    (Intel SGX TCB Signing certificate, then the root). Without it the TCB info and QE
    identity signatures are reported as not verified.
    """

    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    root_crl: x509.CertificateRevocationList | None = None
    pck_crl: x509.CertificateRevocationList | None = None
    tcb_signing_chain: tuple[x509.Certificate, ...] | None = None

    @classmethod
    def from_files(
        cls,
        *,
        tcb_info: Path | str | None = None,
        qe_identity: Path | str | None = None,
        root_crl: Path | str | None = None,
        pck_crl: Path | str | None = None,
        tcb_signing_chain: Path | str | None = None,
    ) -> TdxCollateral:
        """Load collateral from files (CRLs as DER, PEM or hex). Raises
        EvidenceFormatError (``check="collateral_format"``) naming a file that is
        missing, unreadable or unparseable."""

        def read(path: Path | str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise _fmt(str(path), f"cannot read ({exc.strerror})") from exc

        chain = None
        if tcb_signing_chain is not None:
            chain = tuple(load_pem_chain(read(tcb_signing_chain), what="TCB signing chain"))
        return cls(
            tcb_info=TcbInfo.from_json(read(tcb_info)) if tcb_info is not None else None,
            qe_identity=(
                QeIdentity.from_json(read(qe_identity)) if qe_identity is not None else None
            ),
            root_crl=load_crl(read(root_crl), what="root CRL") if root_crl is not None else None,
            pck_crl=load_crl(read(pck_crl), what="PCK CRL") if pck_crl is not None else None,
            tcb_signing_chain=chain,
        )


# --- checks ---------------------------------------------------------------------------


def _ecdsa_ok(public_key: Any, signature: bytes, data: bytes) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        return False
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


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
        if not _ecdsa_ok(leaf.public_key(), signature, body):
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
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
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
        if sgx_status in _CONFIG_STATUSES or tdx_status in _CONFIG_STATUSES:
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
    fields and the checks. Raises VerificationError naming the failed check."""
    fields: dict[str, Any] = {}
    checks: list[Check] = [
        check_crls(chain, root_crl=collateral.root_crl, pck_crl=collateral.pck_crl, now=now)
    ]
    signed: list[tuple[str, bytes, bytes]] = []
    qe_status = None
    if collateral.qe_identity is not None:
        ident = collateral.qe_identity
        _fresh(ident.issue_date, ident.next_update, now, "QE identity")
        qe_status = evaluate_qe_identity(ident, quote.qe_report)
        fields["qe_identity_status"] = qe_status
        checks.append(Check("qe_identity", True, f"TD_QE identity matched, status {qe_status}"))
        signed.append(("QE identity", ident.signed_body, ident.signature))
    if collateral.tcb_info is not None:
        info = collateral.tcb_info
        _fresh(info.issue_date, info.next_update, now, "TCB info")
        result = evaluate_tcb(info, quote, pck, qe_status)
        fields["tcb_status"] = result.status
        fields["tcb_date"] = result.tcb_date
        fields["tcb_advisory_ids"] = list(result.advisory_ids)
        fields["tcb_evaluation_data_number"] = info.tcb_evaluation_data_number
        checks.append(Check("tcb_status", True, f"FMSPC {info.fmspc.hex()}: {result.status}"))
        signed.insert(0, ("TCB info", info.signed_body, info.signature))
    else:
        checks.append(Check("tcb_status", None, "not evaluated: no TCB info supplied"))
    if signed:
        if collateral.tcb_signing_chain is None:
            checks.append(
                Check("collateral_signature", None, "not verified: TCB-signing chain not supplied")
            )
        else:
            checks.append(
                verify_collateral_signatures(
                    collateral.tcb_signing_chain, signed, root=root, now=now
                )
            )
            if collateral.root_crl is not None:
                _check_one_crl(
                    collateral.root_crl,
                    issuer=root,
                    subject=collateral.tcb_signing_chain[0],
                    now=now,
                    what="root CA CRL",
                )
    return fields, checks
