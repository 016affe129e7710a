"""Sealed state: enclave state at rest, encrypted under a platform-derived key.

The sealing key comes from the caller: on a confidential VM it is the platform's
``sealing_key(label)`` (the SNP derived key, or the simulated platform's equivalent),
which is bound to the launch measurement, so a workload with another measurement
derives another key and cannot unseal. Typical use::

    box = SealedBox(platform.sealing_key(b"watermark-ledger"))
    ledger = SealedFile(state_dir / "ledger.sealed", box, label=b"watermark-ledger")
    ledger.write(data); data = ledger.read()

Blob layout (big-endian)::

    magic     8   b"SEALSTAT"
    version   1   1
    nonce    12   random
    sealed    n   AES-256-GCM ciphertext || 16-byte tag

The associated data is ``magic || version || u16(len(label)) || label``, so a blob only
opens under the same key *and* the same label (a ledger cannot be replayed as a key).
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealserve.errors import CryptoError, SealedFormatError, UnavailableError

SEALED_MAGIC = b"SEALSTAT"
SEALED_VERSION = 1
SEALING_KEY_SIZE = 32
_NONCE = 12
_HEAD = len(SEALED_MAGIC) + 1
_MIN_BLOB = _HEAD + _NONCE + 16


class SealedBox:
    """Seals and unseals byte strings with one 32-byte sealing key (AES-256-GCM)."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != SEALING_KEY_SIZE:
            raise CryptoError(f"a sealing key must be {SEALING_KEY_SIZE} bytes")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "SealedBox(<key hidden>)"

    @staticmethod
    def _aad(label: bytes) -> bytes:
        if not label or len(label) > 0xFFFF:
            raise CryptoError("a sealing label must be 1..65535 bytes")
        return SEALED_MAGIC + bytes([SEALED_VERSION]) + struct.pack(">H", len(label)) + label

    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to ``label``; raises :class:`CryptoError` for a
        bad label."""
        aad = self._aad(label)
        nonce = os.urandom(_NONCE)
        return aad[:_HEAD] + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        """Decrypt a blob made by :meth:`seal` with the same key and label.

        Raises :class:`SealedFormatError` if the blob is not sealed state (magic,
        version, length) and :class:`CryptoError` if it was sealed under another key
        (another measurement or platform), another label, or was modified.
        """
        aad = self._aad(label)
        if len(blob) < _MIN_BLOB or blob[: len(SEALED_MAGIC)] != SEALED_MAGIC:
            raise SealedFormatError("bad magic or length: not sealserve sealed state")
        if blob[len(SEALED_MAGIC)] != SEALED_VERSION:
            raise SealedFormatError(
                f"unsupported sealed state version {blob[len(SEALED_MAGIC)]} "
                f"(this sealserve reads {SEALED_VERSION})"
            )
        nonce = blob[_HEAD : _HEAD + _NONCE]
        try:
            return self._aead.decrypt(nonce, blob[_HEAD + _NONCE :], aad)
        except InvalidTag:
            raise CryptoError(
                f"sealed state with label {label!r} failed authentication: it was sealed "
                "under another key (a different measurement or platform) or label, "
                "or it was modified",
                remedy="Unseal only on the workload that sealed it; otherwise start fresh.",
            ) from None


class SealedFile:
    """One sealed blob in a file, replaced atomically on every write."""

    def __init__(self, path: str | os.PathLike[str], box: SealedBox, *, label: bytes) -> None:
        self.path = Path(path)
        self._box = box
        self._label = label

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, plaintext: bytes) -> None:
        """Seal ``plaintext`` and atomically replace the file (temp file in the same
        directory, fsync, rename, fsync the directory); mode 0600.

        Raises :class:`UnavailableError` if the file cannot be written.
        """
        blob = self._box.seal(plaintext, label=self._label)
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            raise UnavailableError(f"cannot write sealed file {self.path}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise UnavailableError(f"cannot write sealed file {self.path}: {exc}") from exc

    def read(self) -> bytes:
        """Read and unseal the file.

        Raises :class:`UnavailableError` if it cannot be read, and what
        :meth:`SealedBox.unseal` raises if it does not open.
        """
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            raise UnavailableError(f"cannot read sealed file {self.path}: {exc}") from exc
        return self._box.unseal(blob, label=self._label)
