"""Launch reference values: the hardware launch measurement a guest built from given
parts will have, so that a policy can pin it (``sealserve measure --launch``).

SEV-SNP: ``sev-snp-measure`` (virtee) computes MEASUREMENT from OVMF, the kernel,
initrd and command line (their hashes are in the measured OVMF page when the firmware
is built with SNP kernel hashes), the vCPU count and type, the VMM type and the guest
features word. We do not re-implement it.

TDX: no maintained Python package computes MRTD or the RTMRs; ``tdx_launch`` does
(MRTD from the TDVF metadata, RTMR2 for QEMU direct boot; RTMR0/RTMR1 come from a
reference boot). See docs/tdx.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sealserve.errors import ConfigError

SNP_MEASUREMENT_LEN = 48
VMM_TYPES = ("qemu", "ec2", "gce")
# sev-snp-measure's default SEV_FEATURES word (0x1: SNP active); 0x21 adds restricted
# injection, as newer QEMU/kernels set. Use what your VMM configures.
DEFAULT_GUEST_FEATURES = 0x1


@dataclass(frozen=True)
class SnpLaunch:
    """The parts of a measured-direct-boot SEV-SNP guest."""

    ovmf: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    vcpus: int = 1
    vcpu_type: str = "EPYC-v4"
    guest_features: int = DEFAULT_GUEST_FEATURES
    vmm: str = "qemu"

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= 512:
            raise ConfigError(f"launch: vcpus must be 1..512, got {self.vcpus}")
        if not 0 <= self.guest_features < 1 << 64:
            raise ConfigError("launch: guest features must be a 64-bit value")
        if self.vmm not in VMM_TYPES:
            raise ConfigError(f"launch: unknown VMM {self.vmm!r} (one of {', '.join(VMM_TYPES)})")
        check_boot_parts(self)


class BootParts(Protocol):
    @property
    def ovmf(self) -> Path: ...
    @property
    def kernel(self) -> Path | None: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def append(self) -> str | None: ...


def check_boot_parts(spec: BootParts) -> None:
    """Refuse a direct-boot spec whose files are missing or whose initrd/command line
    come without a kernel (ConfigError naming the part)."""
    if spec.kernel is None and (spec.initrd is not None or spec.append is not None):
        raise ConfigError("launch: --initrd and --append need --kernel (measured direct boot)")
    for name in ("ovmf", "kernel", "initrd"):
        path = getattr(spec, name)
        if path is not None and not Path(path).is_file() and str(path) != "/dev/null":
            raise ConfigError(f"launch: {name} file {str(path)[:200]!r} does not exist")


def snp_launch_measurement(spec: SnpLaunch) -> bytes:
    """The 48-byte SEV-SNP MEASUREMENT of a guest launched from ``spec``.

    Raises ConfigError for an unknown vCPU type or firmware that cannot measure the
    given kernel (no SNP kernel-hashes section).
    """
    from sevsnpmeasure import guest, vcpu_types, vmm_types
    from sevsnpmeasure.sev_mode import SevMode

    vmm = {"qemu": vmm_types.VMMType.QEMU, "ec2": vmm_types.VMMType.ec2,
           "gce": vmm_types.VMMType.gce}[spec.vmm]  # fmt: skip
    # GCE's firmware sets the vCPU signature itself; the tool then takes none.
    if spec.vmm == "gce":
        sig = None
    else:
        if spec.vcpu_type not in vcpu_types.CPU_SIGS:
            known = ", ".join(sorted(vcpu_types.CPU_SIGS))
            raise ConfigError(f"launch: unknown vCPU type {spec.vcpu_type[:40]!r} ({known})")
        sig = vcpu_types.CPU_SIGS[spec.vcpu_type]
    try:
        digest = guest.calc_launch_digest(
            SevMode.SEV_SNP,
            spec.vcpus,
            sig,
            str(spec.ovmf),
            None if spec.kernel is None else str(spec.kernel),
            None if spec.initrd is None else str(spec.initrd),
            spec.append,
            spec.guest_features,
            vmm_type=vmm,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"launch: sev-snp-measure: {exc}") from exc
    if len(digest) != SNP_MEASUREMENT_LEN:
        raise ConfigError(f"launch: sev-snp-measure gave {len(digest)} bytes, not 48")
    return bytes(digest)


# The TCB floor of every starter policy sealserve writes (and of DEFAULT_POLICY): the
# firmware SPLs below which AMD has withdrawn SEV-SNP security fixes on every product
# line we verify. Raise it to your fleet's current values (`sealserve verify` prints
# reported_tcb); a TCB of all zeros never passes.
STARTER_MIN_TCB = {"bl": 3, "snp": 8}
# The same for Intel TDX: a per-byte floor on TEE_TCB_SVN (TDX module minor SVN 3,
# SEAM loader / late-microcode SVN 2: below every level Intel's TCB info lists as
# UpToDate, and below every genuine quote we hold). Raise it to your fleet's values
# (`sealserve verify` prints tee_tcb_svn); Intel's verdict is `tcb_status`.
STARTER_MIN_TEE_TCB_SVN = "03000200000000000000000000000000"
TDX_LAUNCH_REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2")


def reference_policy(
    *,
    platform: str,
    measurement: bytes | None = None,
    registers: Mapping[str, bytes] | None = None,
    manifest_digest: bytes | None = None,
    min_tcb: dict[str, int] | None = None,
    min_tee_tcb_svn: bytes | None = None,
) -> str:
    """A release/client policy in the form ``broker set-policy`` accepts: the platform,
    its launch measurement, the manifest digest (when given) and a minimum TCB.

    ``platform`` is "sev-snp" or "simulated-sev-snp" (with the 48-byte
    ``measurement``), or "tdx" (with ``registers`` mrtd, rtmr0, rtmr1 and rtmr2, 48
    bytes each). Raises ConfigError otherwise, naming what is missing or wrong.
    """
    lines = ["# Written by `sealserve measure`: pins this launch measurement and build.",
             "version = 1"]  # fmt: skip
    if platform == "tdx":
        section = _tdx_section(registers or {}, min_tee_tcb_svn)
        lines.append('platforms = ["tdx"]')
    elif platform in ("sev-snp", "simulated-sev-snp"):
        if measurement is None or len(measurement) != SNP_MEASUREMENT_LEN:
            got = "none" if measurement is None else f"{len(measurement)} bytes"
            raise ConfigError(f"launch measurement: expected 48 bytes, got {got}")
        tcb = dict(STARTER_MIN_TCB if min_tcb is None else min_tcb)
        section = ["[sev-snp]", f'measurement = ["{measurement.hex()}"]']
        if tcb:
            section.append("min_tcb = { " + ", ".join(f"{k} = {v}" for k, v in tcb.items()) + " }")
        if platform == "sev-snp":
            lines.append('platforms = ["sev-snp"]')
        else:
            lines += ["# SIMULATED platform: development only (its root is a local file).",
                      "unsafe_allow_simulated = true"]  # fmt: skip
    else:
        raise ConfigError(f"launch: no reference policy for platform {platform[:40]!r}")
    if manifest_digest is not None:
        lines.append(f'manifest_digests = ["{manifest_digest.hex()}"]')
    return "\n".join([*lines, "", *section]) + "\n"


def _tdx_section(registers: Mapping[str, bytes], floor: bytes | None) -> list[str]:
    missing = [r for r in TDX_LAUNCH_REGISTERS if r not in registers]
    if missing:
        raise ConfigError(
            f"launch: a TDX policy pins {', '.join(TDX_LAUNCH_REGISTERS)}; missing "
            f"{', '.join(missing)}",
            remedy="Give --memory MIB and --acpi-tables FILE (QEMU's tables for the VM "
            "shape) with --kernel: RTMR0 and RTMR1 are then computed (docs/tdx.md); or "
            "read them from a reference boot's quote and pass --rtmr0/--rtmr1 HEX.",
        )
    out = ["[tdx]"]
    for name in TDX_LAUNCH_REGISTERS:
        if len(registers[name]) != 48:
            raise ConfigError(f"launch: {name} must be 48 bytes, got {len(registers[name])}")
        out.append(f'{name} = ["{registers[name].hex()}"]')
    floor_hex = STARTER_MIN_TEE_TCB_SVN if floor is None else floor.hex()
    out.append(f'min_tee_tcb_svn = "{floor_hex}"')
    return out
