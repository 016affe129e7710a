"""AMD SEV-SNP certificates: the cert table, VCEK extensions, trusted roots, the chain.

Over 400 lines: the cert table, VCEK extensions and chain are one AMD spec.

Chain (AMD VCEK/KDS spec): ARK (self-signed) -> ASK (or ASVK for VLEKs) -> VCEK (or
VLEK). ARK/ASK signatures are RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48. The
verified ARK/ASK pairs and VCEK signatures are cached per process (keyed by the
certificates themselves), so a warm verification only pays for the report signature.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from sealserve.attestation.x509names import common_name
from sealserve.errors import ConfigError, EvidenceFormatError, VerificationError

# --- the cert table (GHCB spec "SNP Extended Guest Request"; Linux configfs-tsm auxblob)

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_ENTRY = struct.Struct("<16sII")
_MAX_ENTRIES = 64


@dataclass(frozen=True)
class CertTable:
    """Certificates that travel with a report, by GUID. Build with :meth:`from_bytes`."""

    entries: tuple[tuple[uuid.UUID, bytes], ...]

    @classmethod
    def from_bytes(cls, data: bytes) -> CertTable:
        """Parse a GUID table of ``{guid, offset, length}`` entries ended by a zero entry.

        GUIDs are read in RFC 4122 byte order (as AMD's tools write them). Raises
        EvidenceFormatError (``check="cert_table"``) on a truncated table, a missing
        terminator, an entry pointing outside the data or into the table, or a
        duplicated GUID.
        """
        data = bytes(data)
        entries: list[tuple[uuid.UUID, int, int]] = []
        pos = 0
        while True:
            if pos + _ENTRY.size > len(data):
                raise _table_error("the table has no all-zero terminating entry")
            raw_guid, offset, length = _ENTRY.unpack_from(data, pos)
            pos += _ENTRY.size
            if raw_guid == bytes(16) and offset == 0 and length == 0:
                break
            if len(entries) >= _MAX_ENTRIES:
                raise _table_error(f"more than {_MAX_ENTRIES} entries")
            entries.append((uuid.UUID(bytes=raw_guid), offset, length))
        seen: set[uuid.UUID] = set()
        out = []
        for guid, offset, length in entries:
            if guid in seen:
                raise _table_error(f"GUID {guid} appears twice")
            seen.add(guid)
            if length == 0 or offset < pos or offset + length > len(data):
                raise _table_error(
                    f"entry {guid} (offset {offset}, length {length}) lies outside the "
                    f"certificate data ({pos}..{len(data)})"
                )
            out.append((guid, data[offset : offset + length]))
        return cls(tuple(out))

    @classmethod
    def build(cls, certs: Mapping[uuid.UUID, bytes]) -> CertTable:
        """A table holding ``certs`` (GUID -> DER) in the given order."""
        return cls(tuple((guid, bytes(der)) for guid, der in certs.items()))

    def to_bytes(self) -> bytes:
        """Encode: the entry table, its zero terminator, then the certificates."""
        offset = _ENTRY.size * (len(self.entries) + 1)
        head = bytearray()
        body = bytearray()
        for guid, der in self.entries:
            head += _ENTRY.pack(guid.bytes, offset + len(body), len(der))
            body += der
        head += bytes(_ENTRY.size)
        return bytes(head + body)

    def get(self, guid: uuid.UUID) -> bytes | None:
        for entry_guid, der in self.entries:
            if entry_guid == guid:
                return der
        return None


def _table_error(why: str) -> EvidenceFormatError:
    return EvidenceFormatError(
        f"cert_table: malformed certificate table: {why}", check="cert_table"
    )


# --- loading AMD certificates


@functools.lru_cache(maxsize=256)
def load_amd_certificate(data: bytes) -> x509.Certificate:
    """Load one DER or PEM certificate issued in AMD's format.

    AMD issues every VCEK and VLEK with serial number 0, which RFC 5280 forbids;
    ``cryptography`` loads it but emits CryptographyDeprecationWarning. We accept that
    deliberately, for AMD-format certificates only, and never read ``serial_number``
    (reading it warns again). Raises EvidenceFormatError (``check="certificate"``).
    """
    with warnings.catch_warnings():
        # Only the serial-number-0 deprecation, only around this load (see docstring).
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise EvidenceFormatError(
                f"certificate: not a parseable X.509 certificate ({exc})", check="certificate"
            ) from exc


def load_amd_certificates(data: bytes) -> list[x509.Certificate]:
    """Load every certificate of a PEM bundle, or one DER certificate."""
    if b"-----BEGIN" not in data:
        return [load_amd_certificate(data)]
    out = []
    for block in data.split(b"-----END CERTIFICATE-----"):
        if b"-----BEGIN CERTIFICATE-----" in block:
            pem = block[block.index(b"-----BEGIN") :] + b"-----END CERTIFICATE-----\n"
            out.append(load_amd_certificate(pem))
    return out


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the DER, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


# --- VCEK / VLEK extensions (AMD VCEK spec, OID arc 1.3.6.1.4.1.3704.1)

_AMD_ARC = "1.3.6.1.4.1.3704.1."
SPL_OIDS = {"bl": "3.1", "tee": "3.2", "snp": "3.3", "ucode": "3.8", "fmc": "3.9"}
HWID_OID = "4"
PRODUCT_NAME_OID = "2"


@dataclass(frozen=True)
class AmdExtensions:
    """The AMD-specific extensions of a VCEK or VLEK."""

    product_name: str | None
    spl: Mapping[str, int]
    hwid: bytes | None


def _der_small(value: bytes, tag: int) -> bytes:
    # The extension values are single short-form DER TLVs (INTEGER, IA5String, OCTET STRING).
    if len(value) < 2 or value[0] != tag or value[1] >= 0x80 or len(value) != 2 + value[1]:
        raise ValueError("not a short DER value")
    return value[2:]


@functools.lru_cache(maxsize=256)
def amd_extensions(cert: x509.Certificate) -> AmdExtensions:
    """Decode productName, the SPL (TCB) values and hwID. Unknown extensions are ignored.

    Raises EvidenceFormatError (``check="vcek_extensions"``) on malformed values.
    """
    values: dict[str, bytes] = {}
    for ext in cert.extensions:
        dotted = ext.oid.dotted_string
        if dotted.startswith(_AMD_ARC) and isinstance(ext.value, x509.UnrecognizedExtension):
            values[dotted[len(_AMD_ARC) :]] = ext.value.value
    try:
        spl = {
            name: int.from_bytes(_der_small(values[oid], 0x02), "big")
            for name, oid in SPL_OIDS.items()
            if oid in values
        }
        product = (
            _der_small(values[PRODUCT_NAME_OID], 0x16).decode("ascii")
            if PRODUCT_NAME_OID in values
            else None
        )
        hwid = values.get(HWID_OID)
        if hwid is not None and len(hwid) not in (8, 64):
            # Newer KDS certificates wrap hwID in a DER OCTET STRING; older ones do not.
            hwid = _der_small(hwid, 0x04)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvidenceFormatError(
            f"vcek_extensions: malformed AMD extension in the signing certificate ({exc})",
            check="vcek_extensions",
        ) from exc
    return AmdExtensions(product_name=product, spl=spl, hwid=hwid)


# --- trusted roots

# sha256(DER) of AMD's genuine certificates (tests/data/vectors/SOURCES.md; Turin in
# sealserve/attestation/roots/SOURCES.md). Package data that does not match is refused.
AMD_PINS: dict[str, dict[str, str]] = {
    "Milan": {
        "ark": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "ask": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        "asvk": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    },
    "Genoa": {
        "ark": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "ask": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        "asvk": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    },
    "Turin": {
        "ark": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        "ask": "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        "asvk": "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
    },
}
_AMD_FINGERPRINTS = frozenset(fp for pins in AMD_PINS.values() for fp in pins.values())


@dataclass(frozen=True)
class RootSet:
    """One product line's ARK with the ASK (VCEK issuer) and/or ASVK (VLEK issuer)."""

    name: str
    ark: x509.Certificate
    ask: x509.Certificate | None
    asvk: x509.Certificate | None

    @property
    def genuine_amd(self) -> bool:
        """True only when the ARK and every intermediate is a pinned AMD certificate."""
        certs = [c for c in (self.ark, self.ask, self.asvk) if c is not None]
        return all(fingerprint(c) in _AMD_FINGERPRINTS for c in certs)

    def issuer_for(self, leaf: x509.Certificate) -> x509.Certificate | None:
        for cand in (self.ask, self.asvk):
            if cand is not None and cand.subject == leaf.issuer:
                return cand
        return None


@dataclass(frozen=True)
class TrustedRoots:
    """The roots a relying party trusts. Pass explicitly; nothing is trusted implicitly.

    ``TrustedRoots.amd()`` holds AMD's pinned roots; ``TrustedRoots.intel_sgx()`` the
    pinned Intel SGX Root CA (TDX quotes are refused unless it is trusted);
    ``TrustedRoots.vendors()`` both; ``TrustedRoots.from_dir(path)`` a local (e.g.
    simulated) root; combine with ``+``. SEV-SNP evidence chaining to a root that is not
    a pinned AMD one is labelled ``Platform.SIMULATED_SNP``.
    """

    sets: tuple[RootSet, ...]
    intel: bool = False

    @classmethod
    @functools.cache
    def intel_sgx(cls) -> TrustedRoots:
        """Trust the pinned Intel SGX Root CA (for TDX quotes) and nothing else.

        Raises VerificationError (``check="pck_chain"``) if the packaged root was altered.
        """
        from sealserve.attestation.tdx_pck import intel_sgx_root_ca

        intel_sgx_root_ca()  # pin-checked now, not at the first quote
        return cls((), intel=True)

    @classmethod
    def vendors(cls) -> TrustedRoots:
        """AMD's and Intel's pinned roots: every genuine platform sealserve verifies."""
        return cls.amd() + cls.intel_sgx()

    @classmethod
    @functools.cache
    def amd(cls) -> TrustedRoots:
        """AMD's ARK/ASK/ASVK for Milan, Genoa and Turin from package data, pin-checked.

        Raises VerificationError (``check="root_pin"``) if a packaged file was altered.
        """
        sets = []
        base = resources.files("sealserve.attestation") / "roots"
        for product, pins in AMD_PINS.items():
            certs: dict[str, x509.Certificate] = {}
            for role, pin in pins.items():
                cert = load_amd_certificate((base / f"{product.lower()}_{role}.pem").read_bytes())
                if fingerprint(cert) != pin:
                    raise VerificationError(
                        f"root_pin: packaged {product} {role.upper()} does not match its pin",
                        check="root_pin",
                    )
                certs[role] = cert
            sets.append(RootSet(product, certs["ark"], certs["ask"], certs["asvk"]))
        return cls(tuple(sets))

    @classmethod
    def from_dir(cls, path: str | Path, *, name: str | None = None) -> TrustedRoots:
        """A root from ``ark.pem`` plus ``ask.pem`` and/or ``asvk.pem`` in ``path``.

        Raises ConfigError when the files are missing or unreadable, and
        EvidenceFormatError when they hold no certificate.
        """
        path = Path(path)
        try:
            ark = load_amd_certificate((path / "ark.pem").read_bytes())
            ask_file, asvk_file = path / "ask.pem", path / "asvk.pem"
            ask = load_amd_certificate(ask_file.read_bytes()) if ask_file.exists() else None
            asvk = load_amd_certificate(asvk_file.read_bytes()) if asvk_file.exists() else None
        except OSError as exc:
            raise ConfigError(f"roots: cannot read trusted roots from {path}: {exc}") from exc
        if ask is None and asvk is None:
            raise ConfigError(f"roots: {path} holds no ask.pem or asvk.pem")
        return cls((RootSet(name or f"local:{path}", ark, ask, asvk),))

    def __add__(self, other: TrustedRoots) -> TrustedRoots:
        return TrustedRoots(self.sets + other.sets, intel=self.intel or other.intel)

    def find(self, leaf: x509.Certificate) -> tuple[RootSet, x509.Certificate] | None:
        """The root set and intermediate whose subject names ``leaf``'s issuer."""
        for root_set in self.sets:
            inter = root_set.issuer_for(leaf)
            if inter is not None:
                return root_set, inter
        return None


# --- signatures and validity

_PSS_SHA384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@functools.lru_cache(maxsize=512)
def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    # Cached per process: the certificates are immutable and hashable by DER.
    key = issuer.public_key()
    if child.issuer != issuer.subject or not isinstance(key, rsa.RSAPublicKey):
        return False
    if child.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        child.signature_hash_algorithm, hashes.SHA384
    ):
        return False
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, _PSS_SHA384, hashes.SHA384())
    except InvalidSignature:
        return False
    return True


def require_signed_by(
    child: x509.Certificate, issuer: x509.Certificate, *, check: str, what: str
) -> None:
    """Raise VerificationError(check=...) unless ``issuer`` signed ``child`` with
    RSASSA-PSS SHA-384 (salt 48)."""
    if not _signed_by(child, issuer):
        raise VerificationError(
            f"{check}: {what} is not signed by {common_name(issuer.subject)} (RSASSA-PSS SHA-384)",
            check=check,
        )


def require_valid_at(certs: Iterable[x509.Certificate], now: datetime) -> None:
    """Raise VerificationError(check="validity_period") if ``now`` is outside any
    certificate's notBefore..notAfter."""
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise VerificationError(
                f"validity_period: {common_name(cert.subject)} is valid "
                f"{cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()}, not at {now.isoformat()}",
                check="validity_period",
            )


# --- where a VCEK comes from when the evidence carries none


def find_cached_vcek(
    cache_dir: str | Path, *, chip_id: bytes, spl: Mapping[str, int], vlek: bool = False
) -> bytes | None:
    """Search a local directory of DER/PEM certificates for the one whose hwID (VCEK)
    and TCB extensions match; ``None`` when there is none. Never touches the network."""
    path = Path(cache_dir)
    if not path.is_dir():
        return None
    for file in sorted(path.iterdir()):
        if file.suffix.lower() not in {".der", ".pem", ".crt", ".cer"}:
            continue
        data = file.read_bytes()
        try:
            cert = load_amd_certificate(data)
            ext = amd_extensions(cert)
        except EvidenceFormatError:
            continue
        if any(ext.spl.get(k) != v for k, v in spl.items()):
            continue
        if vlek or (ext.hwid is not None and hwid_matches(ext.hwid, chip_id)):
            return cert.public_bytes(Encoding.DER)
    return None


def hwid_matches(hwid: bytes, chip_id: bytes) -> bool:
    """A 64-byte hwID equals CHIP_ID; Turin VCEKs carry 8 bytes, CHIP_ID's first 8."""
    if len(hwid) == 64:
        return hwid == chip_id
    return len(hwid) == 8 and chip_id[:8] == hwid


def kds_vcek_url(product: str, chip_id: bytes, spl: Mapping[str, int]) -> str:
    """AMD KDS URL for a VCEK. Offered for operators; nothing in sealserve calls it."""
    hwid = chip_id[:8] if product == "Turin" else chip_id
    params = "&".join(
        f"{k}SPL={spl[n]}"
        for k, n in (
            ("fmc", "fmc"),
            ("bl", "bl"),
            ("tee", "tee"),
            ("snp", "snp"),
            ("ucode", "ucode"),
        )
        if n in spl
    )
    return f"https://kdsintf.amd.com/vcek/v1/{product}/{hwid.hex()}?{params}"
