"""Intel DCAP collateral for TDX quotes: TCB Info (v3, id "TDX"), QE Identity (v2, id
"TD_QE"), the root CA CRL and the PCK CRL, and the TCB-signing chain that signs the JSON.

Over 400 lines: four signed Intel documents parsed to the QVL's sections, one spec.

Collateral comes from files (what Intel PCS or a PCCS returned); this module parses it
and never fetches anything. :mod:`sealserve.attestation.tdx_tcb` evaluates it,
following Intel's Quote Verification Library (QVL, section numbers of its design):

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
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from sealserve.attestation.tdx_pck import (
    load_pem_chain,
)
from sealserve.errors import EvidenceFormatError

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
CONFIG_STATUSES = frozenset({CONFIG_NEEDED, OUT_OF_DATE_CONFIG, CONFIG_AND_SW, RELAUNCH_CONFIG})


_HEX = re.compile(rb"[0-9a-fA-F]+")


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


def _object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _fmt(what, f"not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise _fmt(what, "expected a JSON object")
    return obj


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
        return cls._build(info, body, signature)

    @classmethod
    def from_signed(cls, body: str | bytes, signature: bytes) -> TcbInfo:
        """Parse the signed ``tcbInfo`` object given apart from its 64-byte r||s
        signature (the form of dcap-qvl's collateral JSON). Raises EvidenceFormatError."""
        text = _read_text(body, "TCB info")
        return cls._build(_object(text, "TCB info"), text.encode(), signature)

    @classmethod
    def _build(cls, info: dict[str, Any], body: bytes, signature: bytes) -> TcbInfo:
        if len(signature) != 64:
            raise _fmt("TCB info signature", f"expected 64 bytes, got {len(signature)}")
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
        return cls._build(ident, body, signature)

    @classmethod
    def from_signed(cls, body: str | bytes, signature: bytes) -> QeIdentity:
        """Parse the signed ``enclaveIdentity`` object given apart from its signature.
        Raises EvidenceFormatError."""
        text = _read_text(body, "QE identity")
        return cls._build(_object(text, "QE identity"), text.encode(), signature)

    @classmethod
    def _build(cls, ident: dict[str, Any], body: bytes, signature: bytes) -> QeIdentity:
        if len(signature) != 64:
            raise _fmt("QE identity signature", f"expected 64 bytes, got {len(signature)}")
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
        if stripped[:2] == b"30" and _HEX.fullmatch(stripped):
            return x509.load_der_x509_crl(bytes.fromhex(stripped.decode()))
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise _fmt(what, f"not a CRL ({exc})") from exc


#: The keys of dcap-qvl's ``QuoteCollateralV3`` JSON (what ``from_dcap_json`` reads).
DCAP_JSON_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
# Written by newer dcap-qvl; the PCK chain that counts is the one inside the quote.
DCAP_JSON_IGNORED = ("pck_certificate_chain",)
MAX_COLLATERAL = 1 << 20


@dataclass(frozen=True)
class TdxCollateral:
    """Collateral for TDX verification; every part is optional.

    ``tcb_signing_chain`` is the PEM chain from PCS's ``TCB-Info-Issuer-Chain`` header
    (Intel SGX TCB Signing certificate, then the root); ``qe_identity_signing_chain``
    the one for the QE identity (the same chain unless given apart). Without them the
    TCB info and QE identity signatures are not verified, the claims say
    ``collateral_verified = false``, and TCB-status policy rules refuse.
    """

    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    root_crl: x509.CertificateRevocationList | None = None
    pck_crl: x509.CertificateRevocationList | None = None
    tcb_signing_chain: tuple[x509.Certificate, ...] | None = None
    qe_identity_signing_chain: tuple[x509.Certificate, ...] | None = None

    @property
    def complete(self) -> bool:
        """Every part present: both JSON documents, their signing chains, both CRLs."""
        return None not in (
            self.tcb_info,
            self.qe_identity,
            self.root_crl,
            self.pck_crl,
            self.tcb_signing_chain,
        )

    @classmethod
    def from_dcap_json(cls, source: str | bytes | Path) -> TdxCollateral:
        """Parse collateral in dcap-qvl's ``QuoteCollateralV3`` JSON form: the signed
        TCB info and QE identity as strings with hex signatures and PEM issuer chains,
        both CRLs as hex DER. Every key is required.

        Raises EvidenceFormatError (``check="collateral_format"``) naming the bad part.
        """
        if isinstance(source, Path):
            try:
                source = source.read_bytes()
            except OSError as exc:
                raise _fmt(str(source), f"cannot read ({exc.strerror})") from exc
        if len(source) > MAX_COLLATERAL:
            raise _fmt("collateral", f"{len(source)} bytes is over the {MAX_COLLATERAL} limit")
        doc = _object(_read_text(source, "collateral"), "collateral")
        missing = [k for k in DCAP_JSON_KEYS if not isinstance(doc.get(k), str)]
        if missing:
            raise _fmt("collateral", f"missing or non-string key(s) {', '.join(missing)}")
        unknown = sorted(set(doc) - set(DCAP_JSON_KEYS) - set(DCAP_JSON_IGNORED))
        if unknown:
            raise _fmt("collateral", f"unknown key(s) {', '.join(k[:40] for k in unknown[:5])}")

        def chain(key: str) -> tuple[x509.Certificate, ...]:
            return tuple(load_pem_chain(doc[key].encode(), what=f"collateral {key}"))

        return cls(
            tcb_info=TcbInfo.from_signed(
                doc["tcb_info"], _hex(doc["tcb_info_signature"], "tcb_info_signature", 64)
            ),
            qe_identity=QeIdentity.from_signed(
                doc["qe_identity"], _hex(doc["qe_identity_signature"], "qe_identity_signature", 64)
            ),
            root_crl=load_crl(doc["root_ca_crl"].encode(), what="root_ca_crl"),
            pck_crl=load_crl(doc["pck_crl"].encode(), what="pck_crl"),
            tcb_signing_chain=chain("tcb_info_issuer_chain"),
            qe_identity_signing_chain=chain("qe_identity_issuer_chain"),
        )

    @staticmethod
    def from_dcap_json_cached(data: bytes) -> TdxCollateral:
        """:meth:`from_dcap_json` of ``data``, remembered for the same bytes (a TD sends
        the same collateral until Intel reissues it; parsing is most of the cost).
        Only parsing is cached: every check still runs on every verification."""
        return _parse_dcap_json(bytes(data))

    @classmethod
    def from_cache_dir(cls, directory: str | Path, fmspc: bytes) -> TdxCollateral | None:
        """The collateral for ``fmspc`` in a cache directory: ``<fmspc hex>.json`` in
        dcap-qvl's JSON form (lowercase hex), or None when there is no such file.

        Raises EvidenceFormatError when the file is there but unusable.
        """
        path = Path(directory) / f"{fmspc.hex()}.json"
        if not path.is_file():
            return None
        return cls.from_dcap_json(path)

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


@functools.lru_cache(maxsize=32)
def _parse_dcap_json(data: bytes) -> TdxCollateral:
    return TdxCollateral.from_dcap_json(data)
