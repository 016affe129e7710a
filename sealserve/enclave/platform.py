"""The producing side of attestation: a ``Platform`` makes reports and sealing keys.

Backends: :class:`~sealserve.enclave.simulated.SimulatedPlatform` (a local
ARK -> ASK -> VCEK chain, same report layout as SEV-SNP) and
:class:`~sealserve.enclave.configfs_tsm.ConfigfsTsmPlatform` (Linux configfs-tsm).
The server calls :func:`attest` with the verifier's nonce and its bound keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sealserve.attestation.binding import compute_report_data
from sealserve.attestation.claims import Platform as PlatformKind
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS

DEFAULT_CONFIGFS_TSM = Path("/sys/kernel/config/tsm/report")


@dataclass(frozen=True)
class PlatformReport:
    """A raw report and the certificates that came with it (cert table format)."""

    kind: PlatformKind
    report: bytes
    certs: bytes


class Platform(Protocol):
    """A TEE (or its simulation) as the enclave sees it."""

    @property
    def kind(self) -> PlatformKind: ...

    def report(self, report_data: bytes) -> PlatformReport:
        """A signed report whose REPORT_DATA is ``report_data`` (64 bytes).
        Raises UnavailableError if the platform cannot produce one."""
        ...

    def sealing_key(self, label: bytes) -> bytes:
        """A 32-byte key for sealing state at rest, bound to this guest's measurement
        (a guest with another measurement cannot derive it). Raises UnavailableError."""
        ...


def attest(
    platform: Platform,
    *,
    nonce: bytes,
    tls_spki: bytes,
    manifest: bytes,
    hpke_public_key: bytes,
    runtime_keys: bytes = NO_RUNTIME_KEYS,
) -> Evidence:
    """Evidence answering ``nonce``: a report binding the TLS key, manifest, HPKE key
    and runtime keys record (default: the record of no keys).

    Raises VerificationError(check="nonce") for a nonce shorter than 32 bytes and
    UnavailableError if the platform fails.
    """
    report_data = compute_report_data(
        nonce=nonce,
        tls_spki=tls_spki,
        manifest=manifest,
        hpke_public_key=hpke_public_key,
        runtime_keys=runtime_keys,
    )
    produced = platform.report(report_data)
    return Evidence(
        platform=produced.kind,
        report=produced.report,
        certs=produced.certs,
        manifest=manifest,
        tls_spki=tls_spki,
        hpke_public_key=hpke_public_key,
        nonce=nonce,
        runtime_keys=runtime_keys,
    )
