"""Claims: what a verifier established about a piece of evidence.

Verifiers (SEV-SNP, simulated SEV-SNP, TDX) turn evidence into :class:`Claims` and
never decide trust; policies (``sealserve.attestation.policy``) look only at claims
and decide. A policy is any object with ``verify(claims) -> None`` that raises
:class:`sealserve.errors.PolicyError` on a deny.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sealserve.attestation.runtime_keys import RuntimeKeys


class Platform(enum.StrEnum):
    """Where evidence came from. ``SIMULATED_SNP`` is never a real TEE."""

    SEV_SNP = "sev-snp"
    SIMULATED_SNP = "simulated-sev-snp"
    TDX = "tdx"
    # Azure confidential VMs: the paravisor's SEV-SNP report plus the vTPM's quote
    # (sealserve.attestation.azure_vtpm).
    AZURE_VTPM = "azure-vtpm"


@dataclass(frozen=True)
class Check:
    """One check a verifier ran, for the auditor's table. Failed checks raise; a
    ``Claims`` object only ever holds passed or informational (``passed=None``) checks."""

    name: str
    passed: bool | None
    detail: str = ""


class Measurements(Mapping[str, bytes]):
    """Measurement registers by name. Values are ``bytes`` (what policies compare);
    printed, the registers read as hex strings (``hex()`` gives that dict)."""

    __slots__ = ("_registers",)

    def __init__(self, registers: Mapping[str, bytes]) -> None:
        self._registers = dict(registers)

    def __getitem__(self, name: str) -> bytes:
        return self._registers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._registers)

    def __len__(self) -> int:
        return len(self._registers)

    def hex(self) -> dict[str, str]:
        """``{register: hex digits}``, for display and JSON."""
        return {name: value.hex() for name, value in self._registers.items()}

    def __repr__(self) -> str:
        return repr(self.hex())


@dataclass(frozen=True)
class Claims:
    """Verified facts about one attestation report or quote.

    ``measurements`` holds the platform's measurement registers by name
    (``"measurement"`` for SEV-SNP; ``"mrtd"``, ``"rtmr0"``..``"rtmr3"`` for TDX;
    ``"measurement"`` and ``"pcr0"``..``"pcr23"`` for azure-vtpm) as
    bytes, printed as hex (:class:`Measurements`).
    ``fields`` holds every decoded field in a JSON-friendly form (bytes as hex) for
    display and for platform-specific policies.
    """

    platform: Platform
    report_data: bytes
    debug: bool
    measurements: Mapping[str, bytes]
    fields: Mapping[str, Any]
    checks: tuple[Check, ...] = ()
    # Set by the binding check (sealserve.attestation.binding), when evidence carries a
    # workload manifest: the SHA-256 of that manifest.
    manifest_digest: bytes | None = None
    # Set with it: the runtime keys record the same REPORT_DATA binds.
    runtime_keys: RuntimeKeys | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        object.__setattr__(self, "measurements", Measurements(self.measurements))
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def simulated(self) -> bool:
        return self.platform is Platform.SIMULATED_SNP


class Policy(Protocol):
    """A relying party's rule. ``verify`` returns ``None`` or raises ``PolicyError``."""

    def verify(self, claims: Claims) -> None: ...
