"""Intel PCK certificates: the pinned Intel SGX Root CA, chain validation, and the
Intel SGX extension (FMSPC, PCE-ID, the platform's SGX TCB) of a PCK leaf.

Path validation is done by ``cryptography``'s X.509 verifier with the pinned root as the
only trust anchor; the SGX extension is a small DER structure that ``cryptography`` does
not decode, so a minimal bounds-checked DER reader is kept here.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
from dataclasses import dataclass
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as x509v

from sealserve.attestation.x509names import common_name
from sealserve.errors import EvidenceFormatError, VerificationError

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
_OID_TCB = _SGX + ".2"
_OID_PCESVN = _SGX + ".2.17"
_OID_CPUSVN = _SGX + ".2.18"
_OID_PCEID = _SGX + ".3"
_OID_FMSPC = _SGX + ".4"
PCK_INTERMEDIATE_NAMES = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@functools.cache
def intel_sgx_root_ca() -> x509.Certificate:
    """The Intel SGX Root CA shipped as package data, after checking its pin.

    Raises VerificationError (``check="pck_chain"``) if the shipped file does not match
    the pinned SHA-256 fingerprint or is not self-signed.
    """
    pem = (
        resources.files("sealserve.attestation") / "roots" / "intel_sgx_root_ca.pem"
    ).read_bytes()
    root = x509.load_pem_x509_certificate(pem)
    if not hmac.compare_digest(cert_fingerprint(root), INTEL_SGX_ROOT_CA_SHA256):
        raise VerificationError(
            "pck_chain: the shipped Intel SGX Root CA does not match its pinned fingerprint",
            check="pck_chain",
        )
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise VerificationError(
            "pck_chain: the Intel SGX Root CA is not self-signed", check="pck_chain"
        ) from exc
    return root


def verify_raw_p256(public_key: object, signature: bytes, data: bytes) -> bool:
    """Check an Intel DCAP signature: 64 bytes of big-endian r || s, ECDSA P-256 with
    SHA-256. Returns False for a bad signature or a key that is not P-256."""
    if (
        not isinstance(public_key, ec.EllipticCurvePublicKey)
        or not isinstance(public_key.curve, ec.SECP256R1)
        or len(signature) != 64
    ):
        return False
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_pem_chain(pem: bytes, *, what: str) -> list[x509.Certificate]:
    """Parse a PEM bundle (NUL padding tolerated). Raises EvidenceFormatError."""
    return list(_load_pem_chain(bytes(pem), what))


# Parsing is a pure function of the bytes; the same chains come in every quote of a
# platform (checks on them still run every time).
@functools.lru_cache(maxsize=64)
def _load_pem_chain(pem: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\x00"))
        # cryptography decodes some parts lazily; decode them now so that a damaged
        # certificate is a format error here rather than a stray exception later.
        for cert in certs:
            _ = (cert.version, cert.subject, cert.issuer, cert.extensions, cert.public_key())
            _ = (cert.serial_number, cert.signature_hash_algorithm, cert.not_valid_after_utc)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise EvidenceFormatError(
            f"{what}: not a valid PEM certificate chain ({exc})", check="quote_format"
        ) from exc
    return tuple(certs)


def check_validity(certs: list[x509.Certificate], *, now: datetime.datetime, what: str) -> None:
    """Raise VerificationError (``check="validity_period"``) if any certificate is not
    valid at ``now``."""
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise VerificationError(
                f"validity_period: {what} certificate '{common_name(cert.subject)}' is valid "
                f"from {cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()}, not at {now.isoformat()}",
                check="validity_period",
            )


def verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    *,
    root: x509.Certificate,
    now: datetime.datetime,
    check: str,
) -> list[x509.Certificate]:
    """Validate ``leaf`` up to ``root`` (the only trust anchor) at ``now``.

    Returns the validated chain, leaf first. Raises VerificationError with ``check``.
    """
    verifier = (
        x509v.PolicyBuilder()
        .store(x509v.Store([root]))
        .time(now)
        .extension_policies(
            ca_policy=x509v.ExtensionPolicy.webpki_defaults_ca(),
            # Intel leaves carry no EKU/SAN; accept their extensions as they are.
            ee_policy=x509v.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except x509v.VerificationError as exc:
        raise VerificationError(
            f"{check}: certificate '{common_name(leaf.subject)}' does not chain to the "
            f"pinned Intel SGX Root CA ({exc})",
            check=check,
        ) from exc
    return list(verified.chain)


@dataclass(frozen=True)
class PckChain:
    """A validated PCK chain: leaf, intermediate (Platform or Processor CA), root."""

    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate


def verify_pck_chain(pem: bytes, *, now: datetime.datetime) -> PckChain:
    """Validate the PCK chain carried in a quote against the pinned Intel root.

    Raises EvidenceFormatError for an unparseable chain, VerificationError
    ``check="validity_period"`` for a certificate outside its validity period, and
    ``check="pck_chain"`` for anything else (missing intermediate, wrong issuer, bad
    signature, a root other than the pinned one).
    """
    root = intel_sgx_root_ca()
    certs = load_pem_chain(pem, what="PCK certificate chain")
    if not certs:
        raise VerificationError(
            "pck_chain: the quote carries no PCK certificate", check="pck_chain"
        )
    leaf = certs[0]
    rest = [c for c in certs[1:] if c != root]
    for cert in certs[1:]:
        if common_name(cert.subject) == "Intel SGX Root CA" and cert != root:
            raise VerificationError(
                "pck_chain: the chain's root is not the pinned Intel SGX Root CA "
                f"(sha256 {cert_fingerprint(cert)})",
                check="pck_chain",
            )
    intermediates = [c for c in rest if common_name(c.subject) in PCK_INTERMEDIATE_NAMES]
    if len(intermediates) != 1 or len(rest) != 1:
        raise VerificationError(
            "pck_chain: expected exactly one PCK Platform/Processor CA between the PCK "
            f"certificate and the root, found {len(intermediates)} (chain has {len(certs)} "
            "certificates)",
            check="pck_chain",
        )
    if "SGX PCK Certificate" not in common_name(leaf.subject):
        raise VerificationError(
            f"pck_chain: leaf '{common_name(leaf.subject)}' is not an SGX PCK Certificate",
            check="pck_chain",
        )
    check_validity([leaf, intermediates[0], root], now=now, what="PCK chain")
    verify_chain(leaf, intermediates, root=root, now=now, check="pck_chain")
    return PckChain(leaf=leaf, intermediate=intermediates[0], root=root)


# --- Intel SGX extension -------------------------------------------------------------


def _der_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at ``pos``: (tag, value, next position)."""
    if pos + 2 > len(data):
        raise ValueError("truncated TLV")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated value")
    return tag, data[pos : pos + length], pos + length


def _der_children(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        tag, value, pos = _der_tlv(data, pos)
        out.append((tag, value))
    return out


def _der_oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    parts = [value[0] // 40, value[0] % 40]
    acc = 0
    for b in value[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(str(p) for p in parts)


def _sgx_items(seq: bytes) -> dict[str, tuple[int, bytes]]:
    """Map OID -> (tag, value) for a SEQUENCE OF SEQUENCE { OID, value }."""
    items: dict[str, tuple[int, bytes]] = {}
    for tag, entry in _der_children(seq):
        if tag != 0x30:
            raise ValueError("expected SEQUENCE")
        kids = _der_children(entry)
        if len(kids) != 2 or kids[0][0] != 0x06:
            raise ValueError("expected OID and value")
        items[_der_oid(kids[0][1])] = kids[1]
    return items


@dataclass(frozen=True)
class PckExtension:
    """The parts of the Intel SGX extension used for TCB evaluation."""

    fmspc: bytes
    pceid: bytes
    sgx_tcb_components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes


@functools.lru_cache(maxsize=64)
def pck_extension(cert: x509.Certificate) -> PckExtension:
    """Decode FMSPC, PCE-ID and the SGX TCB (16 component SVNs, PCESVN, CPUSVN) from a
    PCK certificate. Raises EvidenceFormatError if the extension is missing or malformed.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
    except x509.ExtensionNotFound as exc:
        raise EvidenceFormatError(
            "PCK certificate has no Intel SGX extension", check="quote_format"
        ) from exc
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        tag, seq, _ = _der_tlv(raw, 0)
        if tag != 0x30:
            raise ValueError("extension is not a SEQUENCE")
        top = _sgx_items(seq)
        tcb_tag, tcb_seq = top[_OID_TCB]
        if tcb_tag != 0x30:
            raise ValueError("TCB is not a SEQUENCE")
        tcb = _sgx_items(tcb_seq)
        comps = []
        for i in range(1, 17):
            comp_tag, comp = tcb[f"{_OID_TCB}.{i}"]
            if comp_tag != 0x02:
                raise ValueError("TCB component is not an INTEGER")
            comps.append(int.from_bytes(comp, "big"))
        return PckExtension(
            fmspc=top[_OID_FMSPC][1],
            pceid=top[_OID_PCEID][1],
            sgx_tcb_components=tuple(comps),
            pcesvn=int.from_bytes(tcb[_OID_PCESVN][1], "big"),
            cpusvn=tcb[_OID_CPUSVN][1],
        )
    except (ValueError, KeyError, IndexError) as exc:
        raise EvidenceFormatError(
            f"PCK certificate's Intel SGX extension is malformed ({exc})", check="quote_format"
        ) from exc
