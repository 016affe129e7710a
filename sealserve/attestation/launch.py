"""Launch reference values: the hardware launch measurement a guest built from given
parts will have, so that a policy can pin it (``sealserve measure --launch``).

SEV-SNP: ``sev-snp-measure`` (virtee) computes MEASUREMENT from OVMF, the kernel,
initrd and command line (their hashes are in the measured OVMF page when the firmware
is built with SNP kernel hashes), the vCPU count and type, the VMM type and the guest
features word. We do not re-implement it.

TDX: MRTD and RTMR0..2 of a TD also depend on the ACPI tables the VMM hands the
firmware; no maintained Python package computes them. Use Intel's or virtee's
``tdx-measure`` (docs/deploy.md) and pin their output in ``[tdx]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise ConfigError("launch: --initrd and --append need --kernel (measured direct boot)")
        for name in ("ovmf", "kernel", "initrd"):
            path = getattr(self, name)
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


def reference_policy(
    *,
    platform: str,
    measurement: bytes,
    manifest_digest: bytes | None = None,
    min_tcb: dict[str, int] | None = None,
) -> str:
    """A release/client policy in the form ``broker set-policy`` accepts: the platform,
    its launch measurement, the manifest digest (when given) and a minimum TCB.

    ``platform`` is "sev-snp" or "simulated-sev-snp". Raises ConfigError otherwise or
    for a measurement that is not 48 bytes.
    """
    if len(measurement) != SNP_MEASUREMENT_LEN:
        raise ConfigError(f"launch measurement: expected 48 bytes, got {len(measurement)}")
    tcb = dict(STARTER_MIN_TCB if min_tcb is None else min_tcb)
    lines = ["# Written by `sealserve measure`: pins this launch measurement and build.",
             "version = 1"]  # fmt: skip
    if platform == "sev-snp":
        lines.append('platforms = ["sev-snp"]')
    elif platform == "simulated-sev-snp":
        lines += ["# SIMULATED platform: development only (its root is a local file).",
                  "unsafe_allow_simulated = true"]  # fmt: skip
    else:
        raise ConfigError(f"launch: no reference policy for platform {platform[:40]!r}")
    if manifest_digest is not None:
        lines.append(f'manifest_digests = ["{manifest_digest.hex()}"]')
    lines += ["", "[sev-snp]", f'measurement = ["{measurement.hex()}"]']
    if tcb:
        lines.append("min_tcb = { " + ", ".join(f"{k} = {v}" for k, v in tcb.items()) + " }")
    return "\n".join(lines) + "\n"
