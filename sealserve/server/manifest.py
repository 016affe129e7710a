"""Build the workload manifest of a server, and reproduce it for ``sealserve measure``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sealserve import __version__
from sealserve.attestation.claims import Platform as PlatformKind
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.enclave.manifest import ModelMeasurement, WorkloadManifest, code_digest
from sealserve.enclave.platform import Platform
from sealserve.enclave.runtime import check_hooks, record_runtime
from sealserve.server.model_keys import EncryptedModelSource, KeyProvider
from sealserve.server.repository import ModelEntry
from sealserve.server.settings import Settings

if TYPE_CHECKING:
    from sealserve.server.defenses import DefenseSecrets

# The simulated platform's stand-in for a launch measurement: a function of the code,
# so that changing the code changes the measurement, and an auditor can reproduce it.
_SIM_LABEL = b"sealserve-simulated-launch-measurement-v1"


# What `sealserve measure` assumes a correctly deployed server reports. A server whose
# hardening did not fully apply publishes another manifest, and policies pinning the
# expected digest refuse it: an operator must see, not paper over, a weaker process.
EXPECTED_HARDENING = {
    "no_core_dumps": "applied",
    "not_dumpable": "applied",
    "memory_locked": "applied",
}


def expected_hardening(settings: Settings) -> dict[str, str]:
    return dict(EXPECTED_HARDENING) if settings.harden_process else {}


def simulated_measurement(code: str) -> bytes:
    """48 bytes, like SEV-SNP's MEASUREMENT, derived from the installed code's digest."""
    return hashlib.sha384(_SIM_LABEL + bytes.fromhex(code)).digest()


def measure_entries(entries: Iterable[ModelEntry]) -> list[ModelMeasurement]:
    """Model digests: the plaintext SHA-256 the server will load. For an encrypted
    model, from its header (no key needed): decryption refuses any other plaintext."""
    out = []
    for e in entries:
        if isinstance(e.source, EncryptedModelSource):
            key_id, digest = e.source.header_digest()
            out.append(ModelMeasurement(e.name, e.version, digest, key_id))
        else:
            digest = hashlib.sha256(e.source.read(KeyProvider())).hexdigest()
            out.append(ModelMeasurement(e.name, e.version, digest))
    return out


def runtime_json(settings: Settings, *, real_platform: bool) -> dict[str, Any]:
    """This process's runtime record for the manifest; on a real platform, refuses
    (ConfigError) while a Python hook is present unless unsafe_allow_python_hooks."""
    record = record_runtime()
    allow = settings.unsafe_allow_python_hooks
    check_hooks(record, real_platform=real_platform, unsafe_allow_python_hooks=allow)
    return record.to_json(unsafe_allow_python_hooks=allow)


def token_keys_for(settings: Settings) -> dict[str, Any]:
    """The token-key record (thumbprints of file issuers' keys; URL issuers trusted for
    no admin) for the configured issuers; {} without [auth]."""
    auth = settings.auth
    if auth is None:
        return {}
    from sealserve.auth.keys import attested_key_record_for

    return attested_key_record_for(auth.issuers)


def build_manifest(
    settings: Settings,
    models: Iterable[ModelMeasurement],
    *,
    code: str | None = None,
    defenses: Mapping[str, Any] | None = None,
    hardening: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
    token_keys: Mapping[str, Any] | None = None,
) -> WorkloadManifest:
    """The manifest; ``runtime`` defaults to this process's record (``measure``
    reproduces a server's from the same installation and environment), ``token_keys``
    to the record of the configured issuers' JWKS files as they are now (a server
    passes its authenticator's, pinned at start)."""
    if runtime is None:
        runtime = runtime_json(settings, real_platform=False)
    if token_keys is None:
        token_keys = token_keys_for(settings)
    if token_keys:
        extra = {**(extra or {}), "token_keys": dict(token_keys)}
    return WorkloadManifest(
        sealserve_version=__version__,
        code_digest=code or code_digest(),
        config=settings.measured(),
        models=tuple(models),
        defenses=dict(defenses or {}),
        hardening=dict(hardening or {}),
        extra={"hpke_kem": "X25519", **(extra or {})},
        runtime=dict(runtime),
    )


def runtime_keys_for(secrets: DefenseSecrets | None) -> RuntimeKeys:
    """The runtime keys record of a server holding ``secrets`` (its audit key's public
    half; no keys without [defense] or its audit log)."""
    key = secrets.audit_key if secrets is not None else None
    return RuntimeKeys(audit_public_key=key.public_bytes if key is not None else None)


def is_real_platform(platform: Platform | None) -> bool:
    """Evidence from this platform is a hardware TEE's (not simulated, not none)."""
    return platform is not None and platform.kind is not PlatformKind.SIMULATED_SNP
