"""TPM 2.0 quotes: parse a TPMS_ATTEST, check its signature and its PCR digest.

A quote (TPM 2.0 Library, Part 2, 10.12) is the TPM's signed statement of the PCR
values it holds, answering a caller's nonce (``extraData``)::

    magic u32 (0xff544347, TPM_GENERATED_VALUE)   type u16 (0x8018, ATTEST_QUOTE)
    qualifiedSigner TPM2B_NAME    extraData TPM2B_DATA
    clockInfo: clock u64, resetCount u32, restartCount u32, safe u8
    firmwareVersion u64
    TPML_PCR_SELECTION: count u32, then per bank hash u16, sizeofSelect u8, bitmap
    pcrDigest TPM2B_DIGEST        (all big-endian; TPM2B = size u16 then bytes)

``pcrDigest`` is the hash (the signing scheme's, SHA-256 here) of the selected PCR
values concatenated in selection order (bank by bank, PCR index ascending). The
values themselves travel beside the quote; they are trusted only once their hash is
the signed digest. Only RSASSA-PKCS1-v1_5 with SHA-256 signatures (Azure's vTPM
attestation key) and the SHA-256 bank are accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sealserve.errors import EvidenceFormatError, VerificationError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_RSASSA = 0x0014
PCR_COUNT = 24
MAX_QUOTE = 4096


def _bad(message: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"TPM quote: {message}", check="tpm_quote_format")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise _bad(f"truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(struct.unpack(">H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])

    def tpm2b(self, what: str) -> bytes:
        return self.take(self.u16(what), what)


@dataclass(frozen=True)
class TpmQuote:
    """A parsed TPMS_ATTEST of type quote. ``selection`` lists (hash algorithm, PCR
    indices) per bank, in the order the digest covers them."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: tuple[tuple[int, tuple[int, ...]], ...]
    pcr_digest: bytes

    @classmethod
    def from_bytes(cls, message: bytes) -> TpmQuote:
        """Parse. Raises EvidenceFormatError (``check="tpm_quote_format"``) on a wrong
        magic or type, a truncated field or trailing bytes."""
        message = bytes(message)
        if len(message) > MAX_QUOTE:
            raise _bad(f"{len(message)} bytes (limit {MAX_QUOTE})")
        r = _Reader(message)
        magic = r.u32("magic")
        if magic != TPM_GENERATED_VALUE:
            raise _bad(f"magic {magic:#010x} is not TPM_GENERATED_VALUE (not made by a TPM)")
        kind = r.u16("type")
        if kind != TPM_ST_ATTEST_QUOTE:
            raise _bad(f"type {kind:#06x} is not a quote (0x8018)")
        signer = r.tpm2b("qualifiedSigner")
        extra = r.tpm2b("extraData")
        clock, reset, restart, safe = r.u64("clock"), r.u32("clock"), r.u32("clock"), r.u8("clock")
        firmware = r.u64("firmwareVersion")
        banks = []
        for _ in range(r.u32("pcrSelect")):
            alg = r.u16("pcrSelect")
            bitmap = r.take(r.u8("pcrSelect"), "pcrSelect")
            indices = tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
            banks.append((alg, indices))
        digest = r.tpm2b("pcrDigest")
        if r.pos != len(message):
            raise _bad(f"{len(message) - r.pos} trailing bytes after the quote")
        return cls(signer, extra, clock, reset, restart, bool(safe), firmware, tuple(banks), digest)

    def sha256_indices(self) -> tuple[int, ...]:
        """The PCRs quoted from the SHA-256 bank. Raises EvidenceFormatError when the
        quote selects another bank (only SHA-256 is read)."""
        if len(self.selection) != 1 or self.selection[0][0] != TPM_ALG_SHA256:
            algs = [f"{alg:#06x}" for alg, _ in self.selection]
            raise _bad(f"selects banks {algs}; only one SHA-256 bank (0x000b) is accepted")
        return self.selection[0][1]


def rsa_key_from_jwk(jwk: Mapping[str, object]) -> rsa.RSAPublicKey:
    """An RSA public key from a JWK (``kty`` RSA, base64url ``n`` and ``e``). Raises
    EvidenceFormatError (``check="tpm_quote_format"``)."""
    if jwk.get("kty") != "RSA" or not isinstance(jwk.get("n"), str) or not isinstance(
        jwk.get("e"), str
    ):
        raise _bad("the attestation key is not an RSA JWK")

    def number(name: str) -> int:
        text = str(jwk[name])
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError as exc:
            raise _bad(f"the attestation key's {name} is not base64url") from exc
        return int.from_bytes(raw, "big")

    try:
        return rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
    except ValueError as exc:
        raise _bad(f"the attestation key is not a valid RSA key ({exc})") from exc


def _raw_signature(signature: bytes, key: rsa.RSAPublicKey) -> bytes:
    """The RSA signature bytes: as given, or unwrapped from a marshalled TPMT_SIGNATURE
    (RSASSA, SHA-256: the form tpm2_quote writes by default)."""
    size = key.key_size // 8
    if len(signature) == size:
        return signature
    if len(signature) == 6 + size:
        alg, hash_alg, length = struct.unpack_from(">HHH", signature)
        if (alg, hash_alg, length) == (TPM_ALG_RSASSA, TPM_ALG_SHA256, size):
            return signature[6:]
    raise _bad(
        f"signature of {len(signature)} bytes is neither a {size}-byte RSA signature nor "
        "an RSASSA/SHA-256 TPMT_SIGNATURE"
    )


def verify_quote(
    message: bytes,
    signature: bytes,
    *,
    key: rsa.RSAPublicKey,
    pcrs: Mapping[int, bytes],
) -> TpmQuote:
    """Verify a quote: 1 parse; 2 the signature by ``key`` (RSASSA-PKCS1-v1_5,
    SHA-256); 3 ``pcrs`` (index -> SHA-256 bank value) are exactly the quoted PCRs and
    their hash is the signed ``pcrDigest``. The caller checks ``extra_data``.

    Raises EvidenceFormatError or VerificationError (``check`` names the step:
    ``tpm_quote_signature``, ``tpm_pcr_digest``).
    """
    quote = TpmQuote.from_bytes(message)
    try:
        key.verify(_raw_signature(signature, key), message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise VerificationError(
            "tpm_quote_signature: the quote is not signed by the attestation key",
            check="tpm_quote_signature",
        ) from exc
    indices = quote.sha256_indices()
    if sorted(pcrs) != list(indices):
        raise VerificationError(
            f"tpm_pcr_digest: the PCR values given ({sorted(pcrs)}) are not the PCRs the "
            f"quote covers ({list(indices)})",
            check="tpm_pcr_digest",
        )
    if any(len(pcrs[i]) != 32 for i in indices):
        raise _bad("a SHA-256 PCR value is not 32 bytes")
    digest = hashlib.sha256(b"".join(pcrs[i] for i in indices)).digest()
    if not hmac.compare_digest(digest, quote.pcr_digest):
        raise VerificationError(
            "tpm_pcr_digest: the PCR values given are not the ones the quote signed",
            check="tpm_pcr_digest",
        )
    return quote
