"""The runtime keys record: public halves of the secrets a server makes at first start.

The workload manifest holds only what a build and a config decide, so ``sealserve
measure`` reproduces it before the server ever ran. Keys the server creates itself and
keeps sealed (today: the audit log's Ed25519 signing key) exist only after its first
start; their public halves travel in this record instead, beside the manifest in the
evidence, and REPORT_DATA binds its SHA-256 (``sealserve.attestation.binding``, v2).
A verifier that accepted the evidence can therefore trust the keys in it as the
attested server's: an auditor takes the audit public key from here to ``sealserve
audit verify``.

Canonical JSON (``sealserve.canonical``), one encoding per record::

    {"audit": null | {"alg": "Ed25519", "public_key": "<64 hex>"},
     "schema": "sealserve.runtime-keys/v1"}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sealserve.canonical import canonical_json
from sealserve.errors import EvidenceFormatError

SCHEMA = "sealserve.runtime-keys/v1"
MAX_RECORD_BYTES = 4096
_ED25519_LEN = 32


@dataclass(frozen=True)
class RuntimeKeys:
    """Public keys the attested server holds; build with the constructor or
    :meth:`from_bytes` (both check the keys)."""

    audit_public_key: bytes | None = None

    def __post_init__(self) -> None:
        key = self.audit_public_key
        if key is not None and (not isinstance(key, bytes) or len(key) != _ED25519_LEN):
            raise EvidenceFormatError(
                "runtime_keys: the audit public key must be 32 raw Ed25519 bytes",
                check="runtime_keys",
            )

    @property
    def audit_fingerprint(self) -> str | None:
        """``sha256:<hex>`` of the audit public key (the form audit heads name it by)."""
        key = self.audit_public_key
        return None if key is None else "sha256:" + hashlib.sha256(key).hexdigest()

    def to_json(self) -> dict[str, Any]:
        key = self.audit_public_key
        return {
            "schema": SCHEMA,
            "audit": None if key is None else {"alg": "Ed25519", "public_key": key.hex()},
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> RuntimeKeys:
        """Parse a record. Raises EvidenceFormatError(check="runtime_keys") when it is
        too long, not JSON, of another schema, has unknown or malformed fields, or is
        not in canonical form."""
        if len(data) > MAX_RECORD_BYTES:
            raise _bad(f"record is {len(data)} bytes (limit {MAX_RECORD_BYTES})")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad("record is not JSON") from exc
        if not isinstance(obj, dict) or set(obj) != {"schema", "audit"}:
            raise _bad('record must hold exactly "schema" and "audit"')
        if obj["schema"] != SCHEMA:
            raise _bad(f"unknown schema {str(obj['schema'])[:40]!r} (want {SCHEMA})")
        audit = obj["audit"]
        key: bytes | None = None
        if audit is not None:
            if not isinstance(audit, dict) or set(audit) != {"alg", "public_key"}:
                raise _bad('"audit" must hold exactly "alg" and "public_key"')
            if audit["alg"] != "Ed25519":
                raise _bad(f"audit key algorithm {str(audit['alg'])[:20]!r} (want Ed25519)")
            text = audit["public_key"]
            if not isinstance(text, str) or len(text) != 2 * _ED25519_LEN:
                raise _bad("audit public key must be 64 hex characters")
            try:
                key = bytes.fromhex(text)
            except ValueError as exc:
                raise _bad("audit public key must be 64 hex characters") from exc
        record = cls(audit_public_key=key)
        if record.to_bytes() != bytes(data):
            raise _bad("record is not in canonical form")
        return record


#: The record of a server that holds no runtime keys (no audit log).
NO_RUNTIME_KEYS = RuntimeKeys().to_bytes()


def _bad(why: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"runtime_keys: {why}", check="runtime_keys")
