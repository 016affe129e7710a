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
from sealserve.errors import UnavailableError

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
    platform: Platform, *, nonce: bytes, tls_spki: bytes, manifest: bytes, hpke_public_key: bytes
) -> Evidence:
    """Evidence answering ``nonce``: a report binding the TLS key, manifest and HPKE key.

    Raises VerificationError(check="nonce") for a nonce shorter than 32 bytes and
    UnavailableError if the platform fails.
    """
    report_data = compute_report_data(
        nonce=nonce, tls_spki=tls_spki, manifest=manifest, hpke_public_key=hpke_public_key
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
    )


def detect_platform(
    *,
    configfs_root: str | Path = DEFAULT_CONFIGFS_TSM,
    simulated_dir: str | Path | None = None,
) -> Platform:
    """The platform this process runs on.

    A real TEE (configfs-tsm present) wins; otherwise the simulated platform in
    ``simulated_dir`` if one is given. Raises UnavailableError when neither exists.
    """
    from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform
    from sealserve.enclave.simulated import SimulatedPlatform

    if Path(configfs_root).is_dir():
        return ConfigfsTsmPlatform(configfs_root)
    if simulated_dir is not None:
        return SimulatedPlatform(simulated_dir)
    raise UnavailableError(
        f"no TEE found ({configfs_root} does not exist) and no simulated platform given",
        remedy="Run inside an SEV-SNP guest, or create a simulated root with "
        "SimulatedPlatform.create_root(DIR) and pass it.",
    )
