"""Append-only, hash-chained, signed audit log (writer side).

Over 400 lines: the writer of one file format (records, chain, checkpoints, rotation).

Format (``sealserve-audit/1``): UTF-8 JSON lines, one record per line, each the
canonical JSON (sorted keys, no spaces) of an object with at least::

    v     1                      format version
    seq   0, 1, 2, ...           position in the chain, across files
    time  Unix seconds (float)
    kind  open | resume | rotate | query | status | key_release | checkpoint
    prev  hex SHA-256 of the previous record's line bytes ("0"*64 for seq 0)

``query`` records hold ``account``, ``model``, ``input_sha256``, ``output_sha256``,
``decision`` and ``flags`` (detector name -> score); raw inputs never enter the log,
the writer accepts digests only. ``status`` records hold a status change with the
detectors' explanation; ``key_release`` records a model key release.

Every ``checkpoint_every`` records, or when ``checkpoint_interval_s`` has passed since
the last checkpoint, a ``checkpoint`` record is appended carrying ``key`` (the audit
key's fingerprint, ``sha256:<hex of the raw Ed25519 public key>``, which the attested
manifest binds), ``covers_from`` (first seq since the previous checkpoint) and ``sig``,
the Ed25519 signature over the canonical JSON of the record without ``sig``. Because
the record includes ``prev``, a signature commits to the whole chain before it.

Files are ``audit-000001.jsonl``, ``audit-000002.jsonl``, ... A file is closed with a
checkpoint and the next starts with a ``rotate`` record whose ``prev`` is the last hash
of the previous file, so the chain runs across files. Verification is in
:mod:`sealserve.defense.audit.verify`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sealserve.canonical import canonical_json
from sealserve.errors import AuditError, ConfigError

FORMAT = "sealserve-audit/1"
GENESIS = "0" * 64
FILE_PATTERN = re.compile(r"^audit-(\d{6})\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_array(array: object) -> str:
    """Hex SHA-256 of a tensor: dtype, shape and C-order bytes (for query records)."""
    a = np.ascontiguousarray(array)
    head = f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode()
    return hashlib.sha256(head + a.tobytes()).hexdigest()


def public_key_fingerprint(public_key: bytes) -> str:
    """``sha256:<hex>`` of a raw 32-byte Ed25519 public key."""
    return "sha256:" + sha256_hex(public_key)


def load_public_key(data: bytes | str) -> bytes:
    """Raw 32-byte Ed25519 public key from PEM, raw bytes or 64 hex characters.

    Raises ``ConfigError`` when the data is none of these.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise ConfigError("audit public key: unreadable PEM") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("audit public key: PEM is not an Ed25519 key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(text) == 64 and re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode())
    if len(raw) == 32:
        return raw
    raise ConfigError("audit public key must be PEM, 32 raw bytes or 64 hex characters")


class AuditKey:
    """The Ed25519 key that signs checkpoints (kept sealed by the enclave)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.fingerprint = public_key_fingerprint(self.public_bytes)

    @classmethod
    def generate(cls) -> AuditKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> AuditKey:
        """The key from its 32 raw private bytes. Raises ``ConfigError`` otherwise."""
        if len(data) != 32:
            raise ConfigError(f"audit key must be 32 raw Ed25519 bytes, got {len(data)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(data)))

    def to_private_bytes(self) -> bytes:
        """The 32 raw private bytes (seal them; never write them in clear)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_key_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (for auditors)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature over ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def signing_payload(record: Mapping[str, Any]) -> bytes:
    """The bytes a checkpoint's ``sig`` covers: the record without ``sig``."""
    return canonical_json({k: v for k, v in record.items() if k != "sig"})


class AuditLog:
    """Appends records to a directory of chained JSON-lines files. Thread-safe.

    Build with :meth:`open`. Every ``append_*`` has an ``..._at_time(now, ...)``
    variant; the plain one uses ``time.time()``. Raises ``AuditError`` when the
    directory holds a log that cannot be continued.
    """

    def __init__(
        self,
        directory: Path,
        key: AuditKey,
        *,
        checkpoint_every: int,
        checkpoint_interval_s: float,
        max_file_bytes: int,
        fsync: bool,
    ) -> None:
        if checkpoint_every < 1:
            raise ConfigError("audit.checkpoint_every must be at least 1")
        if not checkpoint_interval_s > 0:
            raise ConfigError("audit.checkpoint_interval_s must be positive")
        if max_file_bytes < 4096:
            raise ConfigError("audit.max_file_bytes must be at least 4096")
        self.directory = directory
        self.key = key
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.max_file_bytes = max_file_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self.seq = 0  # seq of the next record
        self.last_hash = GENESIS
        self._since_checkpoint = 0
        self._covers_from = 0
        self._last_checkpoint_time = 0.0
        self._file_no = 0
        self._fh: Any = None
        self._size = 0

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        key: AuditKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        max_file_bytes: int = 64 * 1024 * 1024,
        fsync: bool = True,
        now: float | None = None,
    ) -> AuditLog:
        """Start a new log in ``directory`` or continue the one there.

        A new log starts with an ``open`` record (seq 0); an existing one gets a
        ``resume`` record chained to its last record. Raises ``AuditError`` if the
        last file ends in an incomplete record (a crash mid-write).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        log = cls(
            path,
            key,
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
            max_file_bytes=max_file_bytes,
            fsync=fsync,
        )
        t = time.time() if now is None else now
        log._last_checkpoint_time = t
        files = log_files(path)
        with log._lock:
            if not files:
                log._open_file(1)
                log._write(t, "open", {"format": FORMAT, "key": key.fingerprint})
            else:
                last = files[-1]
                log._resume_from(last)
                log._open_file(int(FILE_PATTERN.match(last.name).group(1)))  # type: ignore[union-attr]
                log._write(t, "resume", {"format": FORMAT, "key": key.fingerprint})
        return log

    @property
    def current_path(self) -> Path:
        return self.directory / f"audit-{self._file_no:06d}.jsonl"

    def _resume_from(self, file: Path) -> None:
        data = file.read_bytes()
        if data and not data.endswith(b"\n"):
            raise AuditError(
                f"{file} ends with an incomplete record (crash during a write)",
                file=str(file),
                problem="incomplete last record",
                remedy="Move the file aside for the auditor and start a new log directory.",
            )
        lines = data.splitlines()
        if not lines:
            raise AuditError(f"{file} is empty; cannot continue its chain", file=str(file))
        try:
            rec = json.loads(lines[-1])
            self.seq = int(rec["seq"]) + 1
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"{file}: last record is unreadable", file=str(file), line=len(lines)
            ) from exc
        self.last_hash = sha256_hex(lines[-1])
        # Records after the file's last checkpoint (or since its first record, which
        # follows the previous file's closing checkpoint) are still to be signed.
        self._covers_from = self.seq
        for raw in reversed(lines):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            self._covers_from = int(rec["seq"]) + (1 if rec.get("kind") == "checkpoint" else 0)
            if rec.get("kind") == "checkpoint":
                break
        self._since_checkpoint = self.seq - self._covers_from

    def _open_file(self, number: int) -> None:
        self._file_no = number
        self._fh = open(self.current_path, "ab")  # noqa: SIM115 - kept open for appends
        self._size = self._fh.tell()

    def _write(self, now: float, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = dict(fields)
        record.update(v=1, seq=self.seq, time=float(now), kind=kind, prev=self.last_hash)
        if kind == "checkpoint":
            record["sig"] = base64.b64encode(self.key.sign(signing_payload(record))).decode()
        line = canonical_json(record)
        self._fh.write(line + b"\n")
        self._fh.flush()
        self._size += len(line) + 1
        self.last_hash = sha256_hex(line)
        self.seq += 1
        if kind == "checkpoint":
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._since_checkpoint = 0
            self._covers_from = self.seq
            self._last_checkpoint_time = now
        else:
            self._since_checkpoint += 1
        return record

    def _checkpoint(self, now: float) -> None:
        self._write(
            now,
            "checkpoint",
            {
                "key": self.key.fingerprint,
                "covers_from": self._covers_from,
                "records": self._since_checkpoint,
            },
        )

    def _after_append(self, now: float) -> None:
        due = self._since_checkpoint >= self.checkpoint_every or (
            now - self._last_checkpoint_time >= self.checkpoint_interval_s
        )
        if due:
            self._checkpoint(now)
        if self._size >= self.max_file_bytes:
            self._rotate(now)

    def _rotate(self, now: float) -> None:
        if self._since_checkpoint:
            self._checkpoint(now)
        previous = self.current_path.name
        self._fh.close()
        self._open_file(self._file_no + 1)
        self._write(now, "rotate", {"previous_file": previous, "key": self.key.fingerprint})

    def append_at_time(self, now: float, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append a record of ``kind`` with ``fields``; returns the record written."""
        if kind in {"open", "resume", "rotate", "checkpoint"}:
            raise ConfigError(f"audit record kind {kind!r} is written by the log itself")
        reserved = {"v", "seq", "time", "kind", "prev", "sig"} & set(fields)
        if reserved:
            raise ConfigError(f"audit record fields {sorted(reserved)} are reserved")
        with self._lock:
            if self._fh is None:
                raise AuditError("the audit log is closed")
            record = self._write(now, kind, fields)
            self._after_append(now)
            return record

    def append_query_at_time(
        self,
        now: float,
        *,
        account: str,
        model: str,
        input_sha256: str,
        output_sha256: str,
        decision: str,
        flags: Mapping[str, float],
    ) -> dict[str, Any]:
        """Record one inference. Digests only: raises ``ConfigError`` on non-digests."""
        for name, value in (("input_sha256", input_sha256), ("output_sha256", output_sha256)):
            if not _HEX64.match(value):
                raise ConfigError(f"audit {name} must be a lowercase hex SHA-256 digest")
        return self.append_at_time(
            now,
            "query",
            {
                "account": account,
                "model": model,
                "input_sha256": input_sha256,
                "output_sha256": output_sha256,
                "decision": decision,
                "flags": {k: float(v) for k, v in flags.items()},
            },
        )

    def append_status_change_at_time(
        self,
        now: float,
        *,
        account: str,
        model: str,
        previous: str,
        status: str,
        expires_at: float | None,
        reason: str,
    ) -> dict[str, Any]:
        """Record an account status change with the policy's reason."""
        return self.append_at_time(
            now,
            "status",
            {
                "account": account,
                "model": model,
                "previous": previous,
                "status": status,
                "expires_at": expires_at,
                "reason": reason,
            },
        )

    def append_key_release_at_time(
        self, now: float, *, model: str, key_id: str, outcome: str, detail: str = ""
    ) -> dict[str, Any]:
        """Record a model key release (or refusal) by the broker."""
        return self.append_at_time(
            now,
            "key_release",
            {"model": model, "key_id": key_id, "outcome": outcome, "detail": detail},
        )

    def maybe_checkpoint_at_time(self, now: float) -> bool:
        """Checkpoint if ``checkpoint_interval_s`` has passed with unsigned records
        (call from a timer so an idle log gets signed). Returns whether it did."""
        with self._lock:
            if self._fh is None or not self._since_checkpoint:
                return False
            if now - self._last_checkpoint_time < self.checkpoint_interval_s:
                return False
            self._checkpoint(now)
            return True

    def checkpoint_at_time(self, now: float) -> None:
        """Sign the chain now (no-op when nothing was appended since the last one)."""
        with self._lock:
            if self._fh is not None and self._since_checkpoint:
                self._checkpoint(now)

    def rotate_at_time(self, now: float) -> Path:
        """Close the current file with a checkpoint and continue in the next; returns it."""
        with self._lock:
            if self._fh is None:
                raise AuditError("the audit log is closed")
            self._rotate(now)
            return self.current_path

    def close_at_time(self, now: float) -> None:
        """Write a final checkpoint and close the file."""
        with self._lock:
            if self._fh is None:
                return
            if self._since_checkpoint:
                self._checkpoint(now)
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self.close_at_time(time.time())


def log_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The log's files in ``directory``, in chain order."""
    return sorted(p for p in Path(directory).iterdir() if FILE_PATTERN.match(p.name))
