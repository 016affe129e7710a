"""HPKE (RFC 9180) wrapping of a model data key for key release.

Both ends use this module: the broker seals with :func:`seal_data_key`, the enclave
opens with :func:`open_data_key`. The construction is ``cryptography``'s HPKE
(``cryptography.hazmat.primitives.hpke``), base mode, single shot:

- suite: DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001),
  AES-256-GCM (AEAD 0x0002);
- recipient key: the enclave's X25519 key, whose 32 raw public bytes are the
  ``hpke_public_key`` of its attestation evidence;
- ``info`` binds the purpose, the key id and the broker's challenge nonce, so a sealed
  key opens only for the release it answers (RFC 9180 also binds the recipient's
  public key into the key schedule).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from sealserve.errors import CryptoError

KEM_ID = 0x0020
KDF_ID = 0x0001
AEAD_ID = 0x0002
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENC_LEN = 32
DATA_KEY_LEN = 32
INFO_LABEL = b"sealserve key release v1"


def release_info(*, key_id: str, nonce: bytes) -> bytes:
    """The HPKE ``info``: label, key id and nonce, each length-prefixed (injective)."""
    parts = (INFO_LABEL, key_id.encode("utf-8"), nonce)
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class SealedKey:
    """A data key sealed to an enclave: the HPKE encapsulated key and ciphertext."""

    enc: bytes
    ciphertext: bytes
    kem_id: int = KEM_ID
    kdf_id: int = KDF_ID
    aead_id: int = AEAD_ID


def seal_data_key(
    data_key: bytes, *, recipient_public_key: bytes, key_id: str, nonce: bytes
) -> SealedKey:
    """Seal ``data_key`` to the raw 32-byte X25519 ``recipient_public_key``.

    Raises CryptoError if the public key is not 32 bytes or not a usable X25519 key.
    """
    if len(recipient_public_key) != 32:
        raise CryptoError(
            f"HPKE public key must be 32 raw X25519 bytes, got {len(recipient_public_key)}"
        )
    try:
        public = X25519PublicKey.from_public_bytes(recipient_public_key)
        out = SUITE.encrypt(data_key, public, info=release_info(key_id=key_id, nonce=nonce))
    except ValueError as exc:
        raise CryptoError(f"cannot seal to this HPKE public key: {exc}") from exc
    return SealedKey(enc=out[:ENC_LEN], ciphertext=out[ENC_LEN:])


def open_data_key(
    sealed: SealedKey, *, private_key: X25519PrivateKey, key_id: str, nonce: bytes
) -> bytes:
    """Open a sealed data key with the enclave's private key; returns 32 bytes.

    Raises CryptoError for another suite, a key sealed to someone else, for another
    key id or nonce, a modified ciphertext, or a result that is not 32 bytes.
    """
    suite = (sealed.kem_id, sealed.kdf_id, sealed.aead_id)
    if suite != (KEM_ID, KDF_ID, AEAD_ID):
        raise CryptoError(
            "unsupported HPKE suite (kem, kdf, aead) = "
            + ", ".join(f"0x{i:04x}" for i in suite)
            + "; expected 0x0020, 0x0001, 0x0002"
        )
    if len(sealed.enc) != ENC_LEN:
        raise CryptoError(f"HPKE enc must be {ENC_LEN} bytes, got {len(sealed.enc)}")
    try:
        key = SUITE.decrypt(
            sealed.enc + sealed.ciphertext,
            private_key,
            info=release_info(key_id=key_id, nonce=nonce),
        )
    except (InvalidTag, ValueError) as exc:
        raise CryptoError(
            "the sealed data key does not open with this enclave's HPKE key for this key "
            "id and challenge (sealed to another key, or modified)"
        ) from exc
    if len(key) != DATA_KEY_LEN:
        raise CryptoError(f"released data key is {len(key)} bytes, expected {DATA_KEY_LEN}")
    return key
