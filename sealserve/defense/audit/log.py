"""Append-only, hash-chained, signed audit log (writer side).

Over 400 lines: the writer of one file format (records, MACs, chain, checkpoints,
rotation, crash recovery).

Format (``sealserve-audit/2``): UTF-8 JSON lines, one record per line, each the
canonical JSON (sorted keys, no spaces) of an object with at least::

    _mac  hex HMAC-SHA256, under the audit MAC key, of the record's canonical JSON
          without ``_mac`` (sorts first: every other top-level key is lowercase)
    v     2                      format version
    seq   0, 1, 2, ...           position in the chain, across files
    time  Unix seconds (float)
    kind  open | resume | rotate | query | refusal | refusals | status | key_release
          | sealed | alarm | checkpoint
    prev  hex SHA-256 of the previous record's line bytes ("0"*64 for seq 0)

The MAC key is derived (HKDF) from the sealed audit key, so only the server can write
a record that carries a valid ``_mac``: a stopped server's unsigned tail cannot be
rewritten, even with the hash chain recomputed, without the server noticing when it
resumes (it checks every record since the last checkpoint). The Ed25519 checkpoints
are what anyone holding the public key can check; the MACs are the server's own check.

``query`` records hold ``account``, ``model``, ``input_sha256``, ``output_sha256``,
``decision`` and ``flags`` (detector name -> score); raw inputs never enter the log,
the writer accepts digests only. ``refusal``/``refusals`` records hold requests refused
before inference (see :mod:`sealserve.defense.audit.refusals`). ``status`` records hold
a status change (the detectors' or an operator's) with its reason; ``key_release``
records a model key release; ``sealed`` records bind a version of sealed state (the
watermark ledger) into the chain; ``alarm`` records something the server detected
about its own state (a rolled-back ledger).

A ``resume`` record starts every run after the first. When the previous run did not
end with a checkpoint (a crash), it says how many unsigned records it found
(``recovered``), how many of them failed their MAC (``mac_failures``, from
``first_bad_seq``) and how many bytes of a torn last record it moved aside
(``torn_bytes`` into ``torn_file``, kept for forensics); a checkpoint follows at once,
so the recovered records are signed.

Every ``checkpoint_every`` records, or when ``checkpoint_interval_s`` has passed since
the last checkpoint, a ``checkpoint`` record is appended carrying ``key`` (the audit
key's fingerprint, ``sha256:<hex of the raw Ed25519 public key>``; the attested
runtime keys record holds that key), ``covers_from`` (first seq since the previous
checkpoint) and ``sig``, the Ed25519 signature over the canonical JSON of the record
without ``sig``. Because the record includes ``prev``, a signature commits to the whole
chain before it. The signature covers the record without ``sig`` and ``_mac``.

The log's head (last seq and its line's SHA-256) is published signed
(:mod:`sealserve.defense.audit.head`); an auditor who saw a head detects any log that
was cut or rewritten below it.

Files are ``audit-000001.jsonl``, ``audit-000002.jsonl``, ... created 0600 in a 0700
directory. A file is closed with a checkpoint and the next starts with a ``rotate``
record whose ``prev`` is the last hash of the previous file, so the chain runs across
files. Verification is in :mod:`sealserve.defense.audit.verify`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealserve.canonical import canonical_json
from sealserve.defense.audit.refusals import RefusalCounter
from sealserve.errors import AuditError, ConfigError

FORMAT = "sealserve-audit/2"
VERSION = 2
GENESIS = "0" * 64
FILE_PATTERN = re.compile(r"^audit-(\d{6})\.jsonl$")
MAC_FIELD = "_mac"
_MAC_PREFIX = b'{"_mac":"'
_MAC_END = len(_MAC_PREFIX) + 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_MAC_INFO = b"sealserve/audit-mac/v1"

log = logging.getLogger("sealserve.audit")


def query_fields(
    account: str, model: str, input_sha256: str, output_sha256: str, decision: str,
    flags: Mapping[str, float], protocol: str,
) -> dict[str, Any]:  # fmt: skip
    """The fields of a ``query`` record. Digests only: raises ``ConfigError`` on
    non-digests."""
    for name, value in (("input_sha256", input_sha256), ("output_sha256", output_sha256)):
        if not _HEX64.match(value):
            raise ConfigError(f"audit {name} must be a lowercase hex SHA-256 digest")
    return {
        "account": account,
        "model": model,
        "input_sha256": input_sha256,
        "output_sha256": output_sha256,
        "decision": decision,
        "flags": {k: float(v) for k, v in flags.items()},
        "protocol": protocol,
    }


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_array(array: object) -> str:
    """Hex SHA-256 of a tensor: dtype, shape and C-order bytes (for query records)."""
    a = np.ascontiguousarray(array)
    head = f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode()
    return hashlib.sha256(head + a.tobytes()).hexdigest()


def record_mac(mac_key: bytes, body: bytes) -> str:
    """Hex HMAC-SHA256 of a record's canonical JSON without ``_mac``."""
    return hmac.digest(mac_key, body, "sha256").hex()


def encode_record(record: Mapping[str, Any], mac_key: bytes) -> bytes:
    """A record's line (without the newline): its canonical JSON with ``_mac`` first.

    Every other top-level key starts with a lowercase letter, so ``_mac`` sorts first
    and the line is still canonical JSON; the body is serialised once.
    """
    body = canonical_json(record)
    return _MAC_PREFIX + record_mac(mac_key, body).encode() + b'",' + body[1:]


def split_mac(line: bytes) -> tuple[str, bytes] | None:
    """``(mac, body without _mac)`` of a record line, or None if it carries no MAC."""
    if not line.startswith(_MAC_PREFIX) or line[_MAC_END : _MAC_END + 2] != b'",':
        return None
    mac = line[len(_MAC_PREFIX) : _MAC_END].decode("ascii", "replace")
    return (mac, b"{" + line[_MAC_END + 2 :]) if _HEX64.match(mac) else None


def mac_ok(mac_key: bytes, line: bytes) -> bool:
    """Whether a record line carries a valid MAC under ``mac_key`` (constant time)."""
    parts = split_mac(line)
    return parts is not None and hmac.compare_digest(parts[0], record_mac(mac_key, parts[1]))


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
        # The per-record MAC key: derived, so the one sealed secret serves both.
        self.mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(
            self.to_private_bytes()
        )

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
    """The bytes a checkpoint's ``sig`` covers: the record without ``sig`` and ``_mac``."""
    return canonical_json({k: v for k, v in record.items() if k not in ("sig", MAC_FIELD)})


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
        refusals: RefusalCounter | None = None,
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
        self.refusals = refusals if refusals is not None else RefusalCounter()
        self._lock = threading.Lock()
        self.seq = 0  # seq of the next record
        self.last_hash = GENESIS
        self._since_checkpoint = 0
        self._covers_from = 0
        self._last_checkpoint_time = 0.0
        self._file_no = 0
        self._fh: Any = None
        self._size = 0
        # What resuming found (empty for a new log or a clean restart); see module doc.
        self.recovery: dict[str, Any] = {}

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
        refusals: RefusalCounter | None = None,
        now: float | None = None,
    ) -> AuditLog:
        """Start a new log in ``directory`` or continue the one there.

        A new log starts with an ``open`` record (seq 0); an existing one gets a
        ``resume`` record chained to its last record. After a crash the last file may
        end in a torn record: it is moved aside into ``<file>.torn-N`` and reported in
        the ``resume`` record. Unsigned records left by a crash are checked against
        their MACs, reported, and signed by a checkpoint written at once. Raises
        ``AuditError`` when the last file cannot be continued (empty, or its last
        complete record unreadable).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = cls(
            path,
            key,
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
            max_file_bytes=max_file_bytes,
            fsync=fsync,
            refusals=refusals,
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
                log.recovery = log._resume_from(last)
                log._open_file(int(FILE_PATTERN.match(last.name).group(1)))  # type: ignore[union-attr]
                log._write(t, "resume", {"format": FORMAT, "key": key.fingerprint,
                                         **log.recovery})  # fmt: skip
                if log.recovery:
                    log._checkpoint(t)  # sign what the crash left unsigned, now
        return log

    @property
    def current_path(self) -> Path:
        return self.directory / f"audit-{self._file_no:06d}.jsonl"

    def _resume_from(self, file: Path) -> dict[str, Any]:
        data = file.read_bytes()
        recovery: dict[str, Any] = {}
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            aside = _keep_aside(file, data[cut:])
            os.truncate(file, cut)
            recovery.update(torn_bytes=len(data) - cut, torn_file=aside.name)
            log.error("audit: %s ended in a torn record (%d bytes): moved aside to %s",
                      file, len(data) - cut, aside)  # fmt: skip
            data = data[:cut]
        lines = data.splitlines()
        if not lines:
            raise AuditError(
                f"{file} holds no complete record; cannot continue its chain",
                file=str(file),
                remedy="Move the file aside for the auditor and start the server again.",
            )
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
        tail: list[bytes] = []
        anchor: bytes | None = None  # the checkpoint the tail follows, if in this file
        for raw in reversed(lines):
            if b'"kind":"checkpoint"' in raw and _field(raw, "kind") == "checkpoint":
                anchor = raw
                break
            tail.append(raw)
        tail.reverse()
        self._covers_from = self.seq - len(tail)
        self._since_checkpoint = len(tail)
        if tail:
            recovery.update(self._check_tail(file, tail, anchor))
        return recovery

    def _check_tail(self, file: Path, tail: list[bytes], anchor: bytes | None) -> dict[str, Any]:
        """Check the MACs and links of the unsigned records a crash left behind."""
        failures, first_bad = 0, None
        prev = anchor
        for i, raw in enumerate(tail):
            linked = prev is None or _field(raw, "prev") == sha256_hex(prev)
            if not (linked and mac_ok(self.key.mac_key, raw)):
                failures += 1
                if first_bad is None:
                    first_bad = self._covers_from + i
            prev = raw
        out: dict[str, Any] = {"recovered": len(tail), "recovered_from": self._covers_from}
        if failures:
            out.update(mac_failures=failures, first_bad_seq=first_bad)
            log.error("audit: %d of %d unsigned records in %s fail their MAC from seq %s: "
                      "the log was rewritten while the server was stopped",
                      failures, len(tail), file, first_bad)  # fmt: skip
        else:
            log.warning("audit: recovered %d unsigned records in %s (MACs verify)",
                        len(tail), file)  # fmt: skip
        return out

    def _open_file(self, number: int) -> None:
        self._file_no = number
        fd = os.open(self.current_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fh = os.fdopen(fd, "ab")
        self._size = self._fh.tell()

    def _write(
        self, now: float, kind: str, fields: Mapping[str, Any], *, flush: bool = True
    ) -> dict[str, Any]:
        record: dict[str, Any] = dict(fields)
        record.update(v=VERSION, seq=self.seq, time=float(now), kind=kind, prev=self.last_hash)
        if kind == "checkpoint":
            record["sig"] = base64.b64encode(self.key.sign(signing_payload(record))).decode()
        line = encode_record(record, self.key.mac_key)
        self._fh.write(line + b"\n")
        if flush:
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
        for aggregate in self.refusals.due(now):
            self._write(now, "refusals", aggregate)
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

    @property
    def closed(self) -> bool:
        return self._fh is None

    def head(self) -> tuple[int, str]:
        """``(seq, sha256 of its line)`` of the last record written (the log's head)."""
        with self._lock:
            return self.seq - 1, self.last_hash

    def append_at_time(self, now: float, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append a record of ``kind`` with ``fields``; returns the record written."""
        if kind in {"open", "resume", "rotate", "checkpoint"}:
            raise ConfigError(f"audit record kind {kind!r} is written by the log itself")
        reserved = {"v", "seq", "time", "kind", "prev", "sig"} & set(fields)
        if reserved:
            raise ConfigError(f"audit record fields {sorted(reserved)} are reserved")
        bad = [k for k in fields if not _FIELD_NAME.match(k)]
        if bad:
            raise ConfigError(f"audit record field names must be lowercase words, not {bad[:3]}")
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
        protocol: str = "grpc",
    ) -> dict[str, Any]:
        """Record one inference (``protocol``: the front door that served it, "grpc" or
        "rest"). Digests only: raises ``ConfigError`` on non-digests."""
        fields = query_fields(account, model, input_sha256, output_sha256, decision, flags,
                              protocol)  # fmt: skip
        return self.append_at_time(now, "query", fields)

    def append_queries(self, queries: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
        """Record several inferences (``(time, query_fields(...))`` each) with one write
        and one flush: a group from the detection worker (release/beside.py)."""
        with self._lock:
            if self._fh is None:
                raise AuditError("the audit log is closed")
            for now, fields in queries:
                self._write(now, "query", fields, flush=False)
                self._after_append(now)
            self._fh.flush()

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
        set_by: str = "detector",
        factor: float | None = None,
        difficulty: int | None = None,
    ) -> dict[str, Any]:
        """Record an account status change (the detectors' or an operator's) with its
        reason; ``factor``/``difficulty`` for throttle/challenge, so that it can be
        re-applied if the state store loses it."""
        fields: dict[str, Any] = {
            "account": account,
            "model": model,
            "previous": previous,
            "status": status,
            "expires_at": expires_at,
            "reason": reason,
            "set_by": set_by,
        }
        if factor is not None:
            fields["factor"] = float(factor)
        if difficulty is not None:
            fields["difficulty"] = int(difficulty)
        return self.append_at_time(now, "status", fields)

    def append_refusal_at_time(
        self, now: float, *, account: str, model: str, reason: str, detail: str, rows: int = 1
    ) -> dict[str, Any] | None:
        """Record a request refused before inference (``reason``: ``rate_limit``,
        ``suspended``, ``challenge``; ``detail``: which limit). Beyond the counter's
        threshold per account and interval it is added up instead (returns None); see
        :mod:`sealserve.defense.audit.refusals`."""
        with self._lock:
            if self._fh is None:
                raise AuditError("the audit log is closed")
            due, own = self.refusals.note(
                now, account=account, model=model, reason=reason, detail=detail, rows=rows
            )
            for aggregate in due:
                self._write(now, "refusals", aggregate)
            record = self._write(now, "refusal", own) if own is not None else None
            if due or record is not None:
                self._after_append(now)
            return record

    def append_sealed_at_time(
        self, now: float, *, name: str, version: int, sha256: str
    ) -> dict[str, Any]:
        """Bind version ``version`` of sealed state ``name`` (its sealed file's SHA-256)
        into the chain, so that an older copy put back is detected."""
        return self.append_at_time(
            now, "sealed", {"name": name, "version": int(version), "sha256": sha256}
        )

    def append_alarm_at_time(self, now: float, *, problem: str, detail: str) -> dict[str, Any]:
        """Record (and sign at once) something the server found wrong with its own state."""
        record = self.append_at_time(now, "alarm", {"problem": problem, "detail": detail})
        self.checkpoint_at_time(now)
        return record

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
            if self._fh is None:
                return False
            for aggregate in self.refusals.due(now):
                self._write(now, "refusals", aggregate)
            if not self._since_checkpoint:
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
            for aggregate in self.refusals.drain():
                self._write(now, "refusals", aggregate)
            if self._since_checkpoint:
                self._checkpoint(now)
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self.close_at_time(time.time())


def _field(line: bytes, name: str) -> Any:
    """Field ``name`` of a record line (None if unreadable)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get(name) if isinstance(rec, dict) else None


def _keep_aside(file: Path, torn: bytes) -> Path:
    """Write a torn record's bytes to ``<file>.torn-N`` (0600, never overwriting)."""
    for n in range(1, 10_000):
        aside = file.with_name(f"{file.name}.torn-{n}")
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(torn)
            fh.flush()
            os.fsync(fh.fileno())
        return aside
    raise AuditError(f"{file}: too many torn records kept aside already", file=str(file))


def log_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The log's files in ``directory``, in chain order."""
    return sorted(p for p in Path(directory).iterdir() if FILE_PATTERN.match(p.name))
