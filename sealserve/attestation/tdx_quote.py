"""Intel TDX quote wire format (DCAP quote versions 4 and 5), parsed into typed objects.

Layout (Intel TDX DCAP Quoting Library API, appendix A; all integers little-endian)::

    header (48)            version u16, att_key_type u16, tee_type u32, qe_svn u16,
                           pce_svn u16, qe_vendor_id [16], user_data [20]
    v5 only: body type u16 (2 = TD report 1.0, 3 = TD report 1.5), body size u32
    TD report body         584 bytes (1.0) or 648 bytes (1.5: + TEE_TCB_SVN2, MRSERVICETD)
    signature data size u32
    signature data         quote signature [64] (r||s), attestation key [64] (x||y),
                           certification data: type u16 (6), size u32, then
                             QE report [384], QE report signature [64],
                             QE auth data: size u16, bytes
                             certification data: type u16 (5), size u32, PCK chain PEM

Parsing checks structure only; nothing here is trusted until
:func:`sealserve.attestation.tdx.verify_tdx_at_time` has checked the signatures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sealserve.errors import EvidenceFormatError

QUOTE_VERSIONS = (4, 5)
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
HEADER_SIZE = 48
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
TD10_SIZE = 584
TD15_SIZE = 648
QE_REPORT_SIZE = 384
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
# Intel's QE vendor id for its own quoting enclave.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


def _format_error(message: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"TDX quote: {message}", check="quote_format")


class _Reader:
    """Bounds-checked cursor over the quote bytes: every read names what it reads."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _format_error(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"{max(self.end - self.pos, 0)} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """The TD report body: what the TDX module measured about the TD.

    ``tee_tcb_svn2`` and ``mrservicetd`` exist only in TD report 1.5 (quote v5, body
    type 3) and are ``None`` otherwise.
    """

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES bit 0 (DEBUG): the host can read and write the TD's memory."""
        return bool(self.td_attributes[0] & 0x01)

    @classmethod
    def from_bytes(cls, data: bytes) -> TdReport:
        """Parse a 584-byte (1.0) or 648-byte (1.5) TD report body.

        Raises EvidenceFormatError for any other size.
        """
        if len(data) not in (TD10_SIZE, TD15_SIZE):
            raise _format_error(f"TD report body is {len(data)} bytes, expected 584 or 648")
        r = _Reader(data)
        tee_tcb_svn = r.take(16, "TEE_TCB_SVN")
        mrseam = r.take(48, "MRSEAM")
        mrsignerseam = r.take(48, "MRSIGNERSEAM")
        seam_attributes = r.take(8, "SEAMATTRIBUTES")
        td_attributes = r.take(8, "TDATTRIBUTES")
        xfam = r.take(8, "XFAM")
        mrtd = r.take(48, "MRTD")
        mrconfigid = r.take(48, "MRCONFIGID")
        mrowner = r.take(48, "MROWNER")
        mrownerconfig = r.take(48, "MROWNERCONFIG")
        rtmr = (r.take(48, "RTMR0"), r.take(48, "RTMR1"), r.take(48, "RTMR2"), r.take(48, "RTMR3"))
        report_data = r.take(64, "REPORTDATA")
        svn2 = service = None
        if len(data) == TD15_SIZE:
            svn2 = r.take(16, "TEE_TCB_SVN2")
            service = r.take(48, "MRSERVICETD")
        return cls(
            tee_tcb_svn=tee_tcb_svn,
            mrseam=mrseam,
            mrsignerseam=mrsignerseam,
            seam_attributes=seam_attributes,
            td_attributes=td_attributes,
            xfam=xfam,
            mrtd=mrtd,
            mrconfigid=mrconfigid,
            mrowner=mrowner,
            mrownerconfig=mrownerconfig,
            rtmr=rtmr,
            report_data=report_data,
            tee_tcb_svn2=svn2,
            mrservicetd=service,
        )


@dataclass(frozen=True)
class QeReport:
    """The quoting enclave's SGX report (384 bytes), signed by the PCK key."""

    raw: bytes
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> QeReport:
        """Parse a 384-byte SGX report body. Raises EvidenceFormatError on a wrong size."""
        if len(data) != QE_REPORT_SIZE:
            raise _format_error(f"QE report is {len(data)} bytes, expected 384")
        r = _Reader(data)
        cpusvn = r.take(16, "QE CPUSVN")
        miscselect = r.u32("QE MISCSELECT")
        r.take(28, "QE reserved")
        attributes = r.take(16, "QE ATTRIBUTES")
        mrenclave = r.take(32, "QE MRENCLAVE")
        r.take(32, "QE reserved")
        mrsigner = r.take(32, "QE MRSIGNER")
        r.take(96, "QE reserved")
        isvprodid = r.u16("QE ISVPRODID")
        isvsvn = r.u16("QE ISVSVN")
        r.take(60, "QE reserved")
        report_data = r.take(64, "QE REPORTDATA")
        return cls(
            raw=bytes(data),
            cpusvn=cpusvn,
            miscselect=miscselect,
            attributes=attributes,
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            isvprodid=isvprodid,
            isvsvn=isvsvn,
            report_data=report_data,
        )


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote (version 4 or 5, ECDSA-256 attestation key, certification
    data type 6 wrapping a PCK certificate chain).

    ``signed_data`` is the exact byte range the attestation key signed (header, the v5
    body descriptor, and the body). ``trailing`` counts bytes after the signature data:
    they are covered by no signature and ignored (one upstream vector carries some).
    """

    header: QuoteHeader
    body_type: int
    td_report: TdReport
    signed_data: bytes
    quote_signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing: int = 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> TdxQuote:
        """Parse a raw TDX quote.

        Raises EvidenceFormatError (``check="quote_format"``) when the input is
        truncated or malformed, is not a TDX quote (tee_type != 0x81), is a quote
        version other than 4 or 5, uses an attestation key other than ECDSA P-256,
        or carries certification data other than type 6 wrapping type 5.
        """
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise _format_error(f"expected bytes, got {type(raw).__name__}")
        raw = bytes(raw)
        r = _Reader(raw)
        version = r.u16("header version")
        att_key_type = r.u16("header att_key_type")
        tee_type = r.u32("header tee_type")
        qe_svn = r.u16("header qe_svn")
        pce_svn = r.u16("header pce_svn")
        qe_vendor_id = r.take(16, "header qe_vendor_id")
        user_data = r.take(20, "header user_data")
        if version not in QUOTE_VERSIONS:
            raise _format_error(f"unsupported quote version {version} (supported: 4, 5)")
        if tee_type != TEE_TYPE_TDX:
            raise _format_error(f"tee_type is {tee_type:#x}, not TDX (0x81)")
        if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise _format_error(
                f"unsupported attestation key type {att_key_type} (only 2 = ECDSA-256 P-256)"
            )
        header = QuoteHeader(
            version=version,
            att_key_type=att_key_type,
            tee_type=tee_type,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            qe_vendor_id=qe_vendor_id,
            user_data=user_data,
        )
        if version == 4:
            body_type, body_size = BODY_TYPE_TD10, TD10_SIZE
        else:
            body_type = r.u16("v5 body type")
            body_size = r.u32("v5 body size")
            expected = {BODY_TYPE_TD10: TD10_SIZE, BODY_TYPE_TD15: TD15_SIZE}.get(body_type)
            if expected is None:
                raise _format_error(
                    f"unsupported v5 body type {body_type} (2 = TD report 1.0, 3 = 1.5)"
                )
            if body_size != expected:
                raise _format_error(
                    f"v5 body type {body_type} has size {body_size}, expected {expected}"
                )
        td_report = TdReport.from_bytes(r.take(body_size, "TD report body"))
        signed_data = raw[: r.pos]
        sig_size = r.u32("signature data size")
        sig = _Reader(raw, r.pos, r.pos + sig_size)
        if sig.end > len(raw):
            raise _format_error(
                f"truncated: signature data size {sig_size} exceeds the "
                f"{len(raw) - r.pos} bytes left"
            )
        quote_signature = sig.take(64, "quote signature")
        attestation_key = sig.take(64, "attestation public key")
        cert_type = sig.u16("certification data type")
        if cert_type != CERT_DATA_QE_REPORT:
            raise _format_error(
                f"certification data type {cert_type} unsupported (expected 6: QE report)"
            )
        cert_size = sig.u32("certification data size")
        cert = _Reader(raw, sig.pos, sig.pos + cert_size)
        if cert.end != sig.end:
            raise _format_error(
                f"certification data size {cert_size} does not fill the signature data "
                f"({sig.end - sig.pos} bytes left)"
            )
        qe_report = QeReport.from_bytes(cert.take(QE_REPORT_SIZE, "QE report"))
        qe_report_signature = cert.take(64, "QE report signature")
        auth_size = cert.u16("QE auth data size")
        qe_auth_data = cert.take(auth_size, "QE auth data")
        inner_type = cert.u16("inner certification data type")
        if inner_type != CERT_DATA_PCK_CHAIN:
            raise _format_error(
                f"inner certification data type {inner_type} unsupported "
                "(expected 5: PCK certificate chain)"
            )
        inner_size = cert.u32("PCK chain size")
        pck_chain_pem = cert.take(inner_size, "PCK certificate chain")
        if cert.pos != cert.end:
            raise _format_error(f"{cert.end - cert.pos} unexpected bytes after the PCK chain")
        return cls(
            header=header,
            body_type=body_type,
            td_report=td_report,
            signed_data=signed_data,
            quote_signature=quote_signature,
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            pck_chain_pem=pck_chain_pem,
            trailing=len(raw) - sig.end,
        )
