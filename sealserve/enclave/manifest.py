"""The workload manifest: what runs, in canonical JSON, bound into attestation evidence.

Canonical form: UTF-8 JSON with sorted keys and no insignificant white space, so the
same workload always yields the same bytes and the same SHA-256. ``sealserve measure``
computes it from a build and a config so an auditor can reproduce the reference value.

Contents: the package version; the digest of the installed code; the effective config
(secrets excluded) and its digest; each model's plaintext SHA-256 and key id; the
defense profiles; process hardening; the runtime record (interpreter, distributions,
loaded modules outside them, Python hooks: ``sealserve.enclave.runtime``); anything
later layers add under ``extra``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealserve.canonical import canonical_json
from sealserve.errors import EvidenceFormatError

SCHEMA = "sealserve.manifest/v1"
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def code_digest(package_dir: Path | None = None) -> str:
    """SHA-256 over every file of the installed ``sealserve`` package (path + content).

    Byte-compiled caches are skipped, so building twice from one commit gives one digest.
    """
    if package_dir is None:
        import sealserve

        package_dir = Path(sealserve.__file__).resolve().parent
    h = hashlib.sha256()
    files = sorted(
        p
        for p in package_dir.rglob("*")
        if p.is_file()
        and not p.name.endswith(_SKIP_SUFFIXES)
        and not (_SKIP_DIRS & set(p.relative_to(package_dir).parts))
    )
    for p in files:
        rel = p.relative_to(package_dir).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelMeasurement:
    name: str
    version: str
    sha256: str
    key_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "key_id": self.key_id}  # fmt: skip


@dataclass(frozen=True)
class WorkloadManifest:
    sealserve_version: str
    code_digest: str
    config: Mapping[str, Any]
    models: tuple[ModelMeasurement, ...]
    defenses: Mapping[str, Any] = field(default_factory=dict)
    hardening: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # What the process runs beyond sealserve's package (sealserve.enclave.runtime).
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        config = dict(self.config)
        return {
            "schema": SCHEMA,
            "sealserve_version": self.sealserve_version,
            "code_digest": self.code_digest,
            "config": config,
            "config_digest": hashlib.sha256(canonical_json(config)).hexdigest(),
            "models": [m.to_json() for m in sorted(self.models, key=lambda m: (m.name, m.version))],
            "defenses": dict(self.defenses),
            "hardening": dict(self.hardening),
            "extra": dict(self.extra),
            "runtime": dict(self.runtime),
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkloadManifest:
        """Parse canonical manifest bytes. Raises EvidenceFormatError if malformed."""
        try:
            obj = json.loads(data)
            if obj.get("schema") != SCHEMA:
                raise ValueError(f"unknown manifest schema {obj.get('schema')!r}")
            m = cls(
                sealserve_version=str(obj["sealserve_version"]),
                code_digest=str(obj["code_digest"]),
                config=dict(obj["config"]),
                models=tuple(
                    ModelMeasurement(
                        str(x["name"]), str(x["version"]), str(x["sha256"]), x.get("key_id")
                    )
                    for x in obj["models"]
                ),
                defenses=dict(obj.get("defenses", {})),
                hardening=dict(obj.get("hardening", {})),
                extra=dict(obj.get("extra", {})),
                runtime=dict(obj.get("runtime", {})),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EvidenceFormatError(
                f"workload manifest is malformed: {exc}", check="manifest_format"
            ) from exc
        if m.to_bytes() != data:
            raise EvidenceFormatError(
                "workload manifest is not in canonical form", check="manifest_format"
            )
        return m
