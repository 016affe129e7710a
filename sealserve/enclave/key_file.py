"""Key files: a model data key kept by its owner, without a key broker.

Byte layout (big-endian)::

    magic        8   b"SEALKEY\\x00"
    version      1   1
    key_id_len   2   1..256
    key_id       L   UTF-8
    key         32   the AES-256 data key
    checksum    32   SHA-256 of every byte before it (catches corruption, not forgery)

A key file is written once (never overwritten), with mode 0600, and never next to the
encrypted model it opens: "next to" means in the output's directory or any directory
below it, because whoever copies or ships that directory would ship the key with it.
Reading refuses a file that group or others can read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sealserve.enclave.model_file import check_key, check_key_id, generate_key
from sealserve.errors import ConfigError, CryptoError, SealedFormatError

KEY_FILE_MAGIC = b"SEALKEY\x00"
KEY_FILE_VERSION = 1
KEY_FILE_MODE = 0o600


@dataclass(frozen=True)
class KeyFile:
    """A key id and its 32-byte data key. The key is checked when the object is built."""

    key_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        object.__setattr__(self, "key", check_key(self.key))

    @classmethod
    def generate(cls, key_id: str) -> KeyFile:
        """A new random data key for ``key_id``."""
        return cls(key_id, generate_key())

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyFile:
        """Parse a key file's contents; raise :class:`SealedFormatError` if malformed."""
        head = len(KEY_FILE_MAGIC) + 3
        if len(data) < head or data[: len(KEY_FILE_MAGIC)] != KEY_FILE_MAGIC:
            raise SealedFormatError("bad magic: not a sealserve key file")
        if data[len(KEY_FILE_MAGIC)] != KEY_FILE_VERSION:
            raise SealedFormatError(
                f"unsupported key file version {data[len(KEY_FILE_MAGIC)]} "
                f"(this sealserve reads {KEY_FILE_VERSION})"
            )
        (kid_len,) = struct.unpack(">H", data[len(KEY_FILE_MAGIC) + 1 : head])
        if len(data) != head + kid_len + 32 + 32:
            raise SealedFormatError("key file has the wrong length (truncated or padded)")
        body, checksum = data[:-32], data[-32:]
        if not hmac.compare_digest(hashlib.sha256(body).digest(), checksum):
            raise SealedFormatError("key file checksum does not match (the file is corrupt)")
        try:
            key_id = data[head : head + kid_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SealedFormatError("key file's key id is not UTF-8") from exc
        try:
            return cls(key_id, data[head + kid_len : head + kid_len + 32])
        except CryptoError as exc:
            raise SealedFormatError(f"key file is invalid: {exc.message}") from exc

    def to_bytes(self) -> bytes:
        kid = self.key_id.encode("utf-8")
        body = (
            KEY_FILE_MAGIC
            + bytes([KEY_FILE_VERSION])
            + struct.pack(">H", len(kid))
            + kid
            + self.key
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> KeyFile:
        """Read a key file. Raises :class:`ConfigError` if it is missing or readable by
        group or others, :class:`SealedFormatError` if its contents are malformed."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(1 << 16)
        except OSError as exc:
            raise ConfigError(f"cannot read key file {p}: {exc.strerror}") from exc
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"key file {p} is accessible by group or others (mode {stat.S_IMODE(mode):04o})",
                remedy=f"Run 'chmod 600 {p}' and keep the key file private.",
            )
        return cls.from_bytes(data)

    def write(
        self, path: str | os.PathLike[str], *, encrypted_output: str | os.PathLike[str]
    ) -> Path:
        """Write this key to a new file with mode 0600 and return its path.

        ``encrypted_output`` is the model file this key opens; the key file must not be
        next to it (see :func:`check_key_location`). Raises :class:`ConfigError` if the
        location is refused or the file already exists or cannot be written.
        """
        p = check_key_location(path, encrypted_output=encrypted_output)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except FileExistsError as exc:
            raise ConfigError(
                f"key file {p} already exists; refusing to overwrite a key",
                remedy="Choose a new key file path (an existing key may still open a model).",
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot create key file {p}: {exc.strerror}") from exc
        try:
            # The umask can only clear bits, but be exact whatever it is.
            os.fchmod(fd, KEY_FILE_MODE)
            os.write(fd, self.to_bytes())
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            p.unlink(missing_ok=True)
            raise ConfigError(f"cannot write key file {p}: {exc.strerror}") from exc
        os.close(fd)
        return p


def check_key_location(
    path: str | os.PathLike[str], *, encrypted_output: str | os.PathLike[str]
) -> Path:
    """Return the resolved key file path if it may hold the key for ``encrypted_output``.

    Refused (:class:`ConfigError`): the key file in the output's directory or any
    directory below it (symlinks resolved), an existing key file path, or a
    directory that does not exist.
    """
    key_path = Path(path).expanduser().resolve()
    out_dir = Path(encrypted_output).expanduser().resolve().parent
    if key_path.parent == out_dir or out_dir in key_path.parents:
        raise ConfigError(
            f"refusing to write the key file {key_path} next to the encrypted model "
            f"(inside {out_dir}): whoever gets that directory would get the key too",
            remedy="Keep the key file in a different directory, outside the output's.",
        )
    if not key_path.parent.is_dir():
        raise ConfigError(f"key file directory {key_path.parent} does not exist")
    if key_path.exists():
        raise ConfigError(
            f"key file {key_path} already exists; refusing to overwrite a key",
            remedy="Choose a new key file path (an existing key may still open a model).",
        )
    return key_path
