"""The broker's key store: data keys encrypted at rest under the operator's master key.

One file, rewritten atomically (temporary file in the same directory, fsync, rename,
fsync of the directory), mode 0600::

    b"SEALKBRK" (8) ‖ version 0x01 (1) ‖ nonce (12) ‖ AES-256-GCM(JSON) ‖ tag (16)

with associated data ``magic ‖ version``. The JSON maps key ids to records (data key
base64, release policy TOML text, trusted roots, revoked flag, times). A fresh random
nonce per write; the master key never leaves this process and no key is ever logged.
Thread-safe: one lock serialises every read-modify-write.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealserve.attestation.policy import policy_from_toml
from sealserve.enclave.model_file import check_key_id
from sealserve.errors import (
    ConfigError,
    CryptoError,
    InputError,
    NotFoundError,
    SealedFormatError,
    UnavailableError,
    quote,
)

MAGIC = b"SEALKBRK"
VERSION = 1
MASTER_KEY_LEN = 32
DATA_KEY_LEN = 32
MAX_POLICY_LEN = 64 * 1024
ROOT_AMD = "amd"
ROOT_INTEL = "intel"
ROOT_SIMULATED = "unsafe-simulated"
ROOT_NAMES = (ROOT_AMD, ROOT_INTEL, ROOT_SIMULATED)
_HEAD = len(MAGIC) + 1


@dataclass(frozen=True)
class KeyRecord:
    """One key id. ``key`` is empty once revoked. ``policy_toml`` empty = no policy
    yet: such a key is never released (default deny)."""

    key_id: str
    key: bytes
    policy_toml: str
    roots: tuple[str, ...]
    revoked: bool
    created_at: float
    updated_at: float

    def __repr__(self) -> str:  # never print the key
        return (
            f"KeyRecord(key_id={self.key_id!r}, roots={self.roots}, revoked={self.revoked}, "
            f"has_policy={bool(self.policy_toml)})"
        )


def check_policy(policy_toml: str) -> str:
    """Raise ConfigError unless ``policy_toml`` is empty or a valid policy file."""
    if len(policy_toml) > MAX_POLICY_LEN:
        raise ConfigError(f"policy: larger than {MAX_POLICY_LEN} characters")
    if policy_toml:
        policy_from_toml(policy_toml)
    return policy_toml


def check_roots(roots: Iterable[str], *, simulated_allowed: bool) -> tuple[str, ...]:
    """Validate root names. Raises ConfigError for an unknown name, or for
    ``unsafe-simulated`` when the broker has no simulated root configured."""
    out = tuple(dict.fromkeys(roots)) or (ROOT_AMD,)
    for name in out:
        if name not in ROOT_NAMES:
            raise ConfigError(f"roots: unknown root {name!r} (choose from {', '.join(ROOT_NAMES)})")
    if ROOT_SIMULATED in out and not simulated_allowed:
        raise ConfigError(
            "roots: 'unsafe-simulated' needs unsafe_simulated_root_dir in the broker config"
        )
    return out


def load_master_key(data: bytes) -> bytes:
    """The 32-byte master key from a file's or variable's contents: 64 hex digits
    (surrounding whitespace ignored) or 32 raw bytes. Raises ConfigError otherwise."""
    text = data.strip()
    try:
        if len(text) == 2 * MASTER_KEY_LEN:
            return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    if len(data) == MASTER_KEY_LEN:
        return bytes(data)
    raise ConfigError(
        "master key: expected 64 hex digits (or 32 raw bytes)",
        remedy="Make one with `sealserve broker init-master-key --out FILE`.",
    )


class KeyStore:
    """Model data keys and their release policies, sealed in one file.

    ``KeyStore.open(path, master_key=...)`` reads an existing file or starts an empty
    store (the file is created on the first write). Raises CryptoError when the file
    does not open under this master key, SealedFormatError when it is not a store.
    """

    def __init__(
        self,
        path: Path,
        master_key: bytes,
        records: dict[str, KeyRecord],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(master_key) != MASTER_KEY_LEN:
            raise ConfigError(f"master key must be {MASTER_KEY_LEN} bytes")
        self.path = path
        self._aead = AESGCM(master_key)
        self._records = records
        self._lock = threading.Lock()
        self._clock = clock

    @classmethod
    def open(
        cls, path: str | Path, *, master_key: bytes, clock: Callable[[], float] = time.time
    ) -> KeyStore:
        path = Path(path)
        aead = AESGCM(master_key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return cls(path, master_key, {}, clock=clock)
        except OSError as exc:
            raise ConfigError(f"key store: cannot read {path}: {exc.strerror}") from exc
        if len(blob) < _HEAD + 12 + 16 or blob[: len(MAGIC)] != MAGIC:
            raise SealedFormatError(f"key store: {path} is not a sealserve broker key store")
        if blob[len(MAGIC)] != VERSION:
            raise SealedFormatError(f"key store: unsupported version {blob[len(MAGIC)]}")
        try:
            plain = aead.decrypt(blob[_HEAD : _HEAD + 12], blob[_HEAD + 12 :], blob[:_HEAD])
        except InvalidTag as exc:
            raise CryptoError(
                f"key store: {path} does not open with this master key (wrong key, or the "
                "file was modified)",
                remedy="Start the broker with the master key this store was written with.",
            ) from exc
        doc = json.loads(plain)
        records = {
            k: KeyRecord(
                key_id=k,
                key=base64.b64decode(v["key"]),
                policy_toml=v["policy_toml"],
                roots=tuple(v["roots"]),
                revoked=v["revoked"],
                created_at=v["created_at"],
                updated_at=v["updated_at"],
            )
            for k, v in doc["keys"].items()
        }
        return cls(path, master_key, records, clock=clock)

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            return self._records.get(key_id)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    def add(
        self, key_id: str, key: bytes, *, policy_toml: str = "", roots: tuple[str, ...]
    ) -> KeyRecord:
        """Store a new key. Raises InputError if the id exists (also when revoked: a
        revoked id is never reused) or the key is not 32 bytes."""
        check_key_id(key_id, error=InputError)
        if len(key) != DATA_KEY_LEN:
            raise InputError(f"a data key must be {DATA_KEY_LEN} bytes, got {len(key)}")
        with self._lock:
            if key_id in self._records:
                raise InputError(
                    f"key id {quote(key_id)} already exists (key ids are never reused)"
                )
            now = self._clock()
            record = KeyRecord(key_id, bytes(key), policy_toml, roots, False, now, now)
            self._commit({**self._records, key_id: record})
            return record

    def set_policy(self, key_id: str, *, policy_toml: str, roots: tuple[str, ...] | None) -> None:
        """Replace a key's policy (and roots, unless None). NotFoundError if unknown."""
        with self._lock:
            old = self._live(key_id)
            new = replace(
                old,
                policy_toml=policy_toml,
                roots=old.roots if roots is None else roots,
                updated_at=self._clock(),
            )
            self._commit({**self._records, key_id: new})

    def revoke(self, key_id: str) -> None:
        """Erase the key material and keep a tombstone. NotFoundError if unknown."""
        with self._lock:
            old = self._live(key_id)
            new = replace(old, key=b"", revoked=True, updated_at=self._clock())
            self._commit({**self._records, key_id: new})

    def _live(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None or record.revoked:
            raise NotFoundError(f"no live key with id {quote(key_id)}")
        return record

    def _commit(self, records: dict[str, KeyRecord]) -> None:
        doc: dict[str, Any] = {
            "format": "sealserve-broker-keys",
            "keys": {
                r.key_id: {
                    "key": base64.b64encode(r.key).decode("ascii"),
                    "policy_toml": r.policy_toml,
                    "roots": list(r.roots),
                    "revoked": r.revoked,
                    "created_at": r.created_at,
                    "updated_at": r.updated_at,
                }
                for r in records.values()
            },
        }
        head = MAGIC + bytes([VERSION])
        nonce = secrets.token_bytes(12)
        blob = head + nonce + self._aead.encrypt(nonce, json.dumps(doc).encode(), head)
        self._write_atomically(blob)
        self._records = records

    def _write_atomically(self, blob: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UnavailableError(f"key store: cannot write {self.path}: {exc.strerror}") from exc
