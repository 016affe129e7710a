"""The audit log's signed head: what an auditor keeps to detect a log cut short.

A head is the seq of the log's last record and the SHA-256 of that record's line,
signed by the audit key (which the attested runtime keys record holds) together with
the time and an optional verifier nonce (``sealserve-audit-head/1``)::

    {"format": "sealserve-audit-head/1", "hash": HEX, "key": "sha256:...",
     "nonce": HEX, "public_key": HEX, "seq": N, "time": T, "sig": BASE64}

The server hands it out through ``sealserve.v1.Audit/GetHead`` and beside its
attestation evidence. An auditor who saw a head checks a log with
``sealserve audit verify --expect-head HEAD``: the log must hold record ``seq`` with
exactly that hash, or it was cut short (or rewritten) below a point the server had
already reached.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealserve.canonical import canonical_json
from sealserve.defense.audit.log import AuditLog, public_key_fingerprint, verify_signature
from sealserve.errors import AuditError, ConfigError

HEAD_FORMAT = "sealserve-audit-head/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PLAIN = re.compile(r"^(\d{1,18}):([0-9a-f]{64})$")
MAX_HEAD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class AuditHead:
    """A point the log reached: record ``seq`` whose line hashes to ``hash``.

    Unsigned heads (``sig`` empty) are what an auditor wrote down by hand
    (``SEQ:HASH``); signed ones come from the server.
    """

    seq: int
    hash: str
    time: float = 0.0
    key: str = ""
    public_key: str = ""
    nonce: str = ""
    sig: str = ""

    def __post_init__(self) -> None:
        if self.seq < 0 or not _HEX64.match(self.hash):
            raise ConfigError("an audit head needs a seq >= 0 and a 64-hex-digit hash")

    @property
    def signed(self) -> bool:
        return bool(self.sig)

    def payload(self) -> bytes:
        """The bytes the signature covers."""
        return canonical_json(
            {"format": HEAD_FORMAT, "seq": self.seq, "hash": self.hash, "time": self.time,
             "key": self.key, "public_key": self.public_key, "nonce": self.nonce}
        )  # fmt: skip

    def to_json(self) -> bytes:
        """The head as JSON (what ``--expect-head`` reads back)."""
        return canonical_json({**json.loads(self.payload()), "sig": self.sig})

    @classmethod
    def from_json(cls, data: bytes | str) -> AuditHead:
        """Parse a head written by :meth:`to_json`. Raises ``ConfigError``."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_HEAD_BYTES:
            raise ConfigError(f"audit head is {len(raw)} bytes; at most {MAX_HEAD_BYTES}")
        try:
            obj: Any = json.loads(raw)
        except ValueError as exc:
            raise ConfigError("audit head is not JSON") from exc
        if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
            raise ConfigError(f"audit head is not a {HEAD_FORMAT} object")
        try:
            return cls(
                seq=_int(obj["seq"]), hash=str(obj["hash"]), time=float(obj.get("time", 0.0)),
                key=str(obj.get("key", "")), public_key=str(obj.get("public_key", "")),
                nonce=str(obj.get("nonce", "")), sig=str(obj.get("sig", "")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"audit head lacks a field or has a wrong type: {exc}") from exc

    @classmethod
    def parse(cls, spec: str) -> AuditHead:
        """``SEQ:HASH`` or a head's JSON. Raises ``ConfigError`` with what was expected."""
        text = spec.strip()
        m = _PLAIN.match(text)
        if m:
            return cls(seq=int(m.group(1)), hash=m.group(2))
        if text.startswith("{"):
            return cls.from_json(text)
        shown = text[:32] + ("..." if len(text) > 32 else "")
        raise ConfigError(
            f"--expect-head {shown!r} ({len(text)} chars) is neither SEQ:HASH (64 lowercase "
            "hex digits) nor a head's JSON (a file from `sealserve audit head`)"
        )

    def verify(self, trusted: Mapping[str, bytes], *, nonce: str | None = None) -> None:
        """Check the signature against ``trusted`` (fingerprint -> raw public key) and,
        if given, that the head answers ``nonce``. Raises ``AuditError``."""
        if not self.signed:
            raise AuditError("the audit head is not signed")
        public = trusted.get(self.key)
        if public is None:
            raise AuditError(f"the audit head is signed by an untrusted key {self.key[:80]!r}")
        try:
            sig = base64.b64decode(self.sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AuditError("the audit head's signature is not base64") from exc
        if not verify_signature(public, sig, self.payload()):
            raise AuditError("the audit head's signature does not verify")
        if nonce is not None and self.nonce != nonce:
            raise AuditError("the audit head does not answer this nonce (a replayed head?)")


def sign_head(log: AuditLog, *, nonce: bytes = b"", now: float | None = None) -> AuditHead:
    """The log's current head, signed by its key, binding ``nonce`` (a verifier's)."""
    seq, digest = log.head()
    head = AuditHead(
        seq=seq,
        hash=digest,
        time=time.time() if now is None else now,
        key=log.key.fingerprint,
        public_key=log.key.public_bytes.hex(),
        nonce=nonce.hex(),
    )
    sig = base64.b64encode(log.key.sign(head.payload())).decode()
    return AuditHead(**{**_fields(head), "sig": sig})


def head_public_key(head: AuditHead) -> bytes:
    """The raw public key a head carries, checked against its fingerprint (so a verifier
    that trusts the attested fingerprint can trust the key). Raises ``AuditError``."""
    try:
        raw = bytes.fromhex(head.public_key)
    except ValueError as exc:
        raise AuditError("the audit head's public key is not hex") from exc
    if len(raw) != 32 or public_key_fingerprint(raw) != head.key:
        raise AuditError("the audit head's public key does not match its fingerprint")
    return raw


def _fields(head: AuditHead) -> dict[str, Any]:
    return {name: getattr(head, name) for name in AuditHead.__slots__}


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("seq must be an integer")
    return value
