"""report_data binding: what the 64 bytes of REPORT_DATA commit to.

::

    report_data = SHA-512( frame(b"sealserve-attestation-v2")
                         ‖ frame(nonce)
                         ‖ frame(SHA-256(TLS SubjectPublicKeyInfo DER))
                         ‖ frame(SHA-256(workload manifest bytes))
                         ‖ frame(SHA-256(HPKE public key bytes))
                         ‖ frame(SHA-256(runtime keys record bytes)) )

    frame(x) = len(x) as 4-byte big-endian ‖ x

The length prefixes make the encoding injective: no two different part lists
serialise to the same bytes, so bytes cannot shift from the nonce into a digest.

v2 added the runtime keys record (``sealserve.attestation.runtime_keys``): the public
halves of keys the server makes at its first start, kept out of the manifest so that
``sealserve measure`` can reproduce the manifest from a build and a config. v1
evidence is no longer produced or accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from sealserve.errors import VerificationError

DOMAIN_LABEL = b"sealserve-attestation-v2"
MIN_NONCE_LEN = 32
MAX_NONCE_LEN = 1024


def _frame(part: bytes) -> bytes:
    return struct.pack(">I", len(part)) + part


def check_nonce(nonce: bytes) -> None:
    """Raise VerificationError(check="nonce") unless 32 <= len(nonce) <= 1024."""
    if not MIN_NONCE_LEN <= len(nonce) <= MAX_NONCE_LEN:
        raise VerificationError(
            f"nonce: a nonce must be {MIN_NONCE_LEN}..{MAX_NONCE_LEN} bytes, got {len(nonce)}",
            check="nonce",
            remedy="Use a fresh random nonce of at least 32 bytes (os.urandom(32)).",
        )


def compute_report_data(
    *, nonce: bytes, tls_spki: bytes, manifest: bytes, hpke_public_key: bytes, runtime_keys: bytes
) -> bytes:
    """The 64-byte REPORT_DATA binding these parts. Raises VerificationError
    (``check="nonce"``) for a nonce shorter than 32 bytes."""
    check_nonce(nonce)
    parts = (
        DOMAIN_LABEL,
        nonce,
        hashlib.sha256(tls_spki).digest(),
        hashlib.sha256(manifest).digest(),
        hashlib.sha256(hpke_public_key).digest(),
        hashlib.sha256(runtime_keys).digest(),
    )
    return hashlib.sha512(b"".join(_frame(p) for p in parts)).digest()


def verify_report_data_binding(
    report_data: bytes,
    *,
    nonce: bytes,
    tls_spki: bytes,
    manifest: bytes,
    hpke_public_key: bytes,
    runtime_keys: bytes,
) -> None:
    """Recompute the binding and compare in constant time.

    Raises VerificationError(check="report_data_binding") on a mismatch (wrong nonce,
    TLS key, manifest, HPKE key or runtime keys) and check="nonce" for a short nonce.
    """
    expected = compute_report_data(
        nonce=nonce,
        tls_spki=tls_spki,
        manifest=manifest,
        hpke_public_key=hpke_public_key,
        runtime_keys=runtime_keys,
    )
    if not hmac.compare_digest(expected, bytes(report_data)):
        raise VerificationError(
            "report_data_binding: REPORT_DATA does not bind this nonce, TLS key, manifest, "
            "HPKE key and runtime keys (stale evidence, or a key, manifest or runtime key "
            "record that is not the attested one)",
            check="report_data_binding",
        )
