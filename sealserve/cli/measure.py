"""``sealserve measure``: the reference values an auditor expects from a build + config,
and the launch measurement of a measured-boot guest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sealserve.errors import ConfigError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "measure",
        help="print the workload manifest and launch reference values",
        description=(
            "With --config: computes, from this installed build and the config alone "
            "(before the first start; no state is read), exactly the workload manifest the "
            "server will attest to (code digest, measured config, model digests, token "
            "keys) and prints its SHA-256. Keys the server makes at first start (the audit "
            "key) are attested beside it, in the evidence's runtime keys record. With "
            "--launch: the expected hardware launch measurement of a guest built from the "
            "given parts (sev-snp: OVMF, kernel, initrd, command line, vCPUs; tdx: MRTD "
            "from OVMF/TDVF and, for QEMU direct boot, RTMR2 from the command line and "
            "initrd, RTMR1 from the kernel and --memory, RTMR0 from the firmware, --memory "
            "and --acpi-tables; simulated: this build). "
            "--policy-out writes a policy pinning the platform, the launch measurement, "
            "the manifest (with --config) and a minimum TCB: the form `broker set-policy` "
            "accepts."
        ),
    )
    p.add_argument("--config", type=Path, help="server settings (TOML)")
    p.add_argument("--json", action="store_true", help="print the manifest itself (JSON)")
    p.add_argument("--policy-out", type=Path, help="write a policy pinning these values")
    launch = p.add_argument_group("launch measurement")
    launch.add_argument(
        "--launch",
        choices=("sev-snp", "simulated", "tdx"),
        help="compute the launch measurement of this platform's guest",
    )
    launch.add_argument(
        "--ovmf", type=Path, help="the OVMF firmware (sev-snp: AmdSev build; tdx: TDVF/OVMF)"
    )
    launch.add_argument("--kernel", type=Path, help="the kernel (measured direct boot)")
    launch.add_argument("--initrd", type=Path, help="the initrd")
    launch.add_argument("--append", help="the kernel command line")
    launch.add_argument("--vcpus", type=int, default=1, help="sev-snp: vCPU count (default 1)")
    launch.add_argument(
        "--vcpu-type", default="EPYC-v4", help="sev-snp: QEMU CPU model (default: %(default)s)"
    )
    launch.add_argument(
        "--guest-features",
        type=lambda x: int(x, 0),
        default=None,
        help="sev-snp: SEV_FEATURES word of the VMSA (default 0x1)",
    )
    launch.add_argument("--vmm", choices=("qemu", "ec2", "gce"), default="qemu",
                        help="sev-snp: the guest's VMM (default: %(default)s)")  # fmt: skip
    launch.add_argument(
        "--min-tcb",
        help="TCB floor for --policy-out, e.g. bl=4,snp=22,ucode=217 (default bl=3,snp=8)",
    )
    launch.add_argument(
        "--tdx-page-order",
        choices=("per-page", "per-section"),
        default="per-page",
        help="tdx: how the VMM added and measured the firmware pages (per-page: upstream "
        "KVM, QEMU 9+ TDX builds; per-section: QEMU 8.x TDX builds; default: %(default)s)",
    )
    launch.add_argument(
        "--memory", type=int, metavar="MIB",
        help="tdx: the TD's memory in MiB (QEMU -m): RTMR0 (TD HOB) and RTMR1 (where QEMU "
        "puts the initrd)",
    )  # fmt: skip
    launch.add_argument(
        "--acpi-tables", type=Path, metavar="FILE",
        help="tdx: QEMU's etc/acpi/tables blob for this machine shape (vCPUs, memory, "
        "devices), for RTMR0; docs/tdx.md says how to get it",
    )  # fmt: skip
    for reg in ("rtmr0", "rtmr1", "rtmr2"):
        launch.add_argument(
            f"--{reg}",
            type=_register,
            help=f"tdx: {reg.upper()} read from a reference boot (96 hex), for --policy-out "
            "(overrides the computed value)",
        )
    launch.add_argument(
        "--min-tee-tcb-svn",
        type=_tee_tcb_svn,
        help="tdx: TEE_TCB_SVN floor for --policy-out, 32 hex (default 0300020000…)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config is None and args.launch is None:
        raise ConfigError("measure: give --config (workload manifest), --launch, or both")
    manifest_digest: bytes | None = None
    code: str | None = None
    if args.config is not None:
        manifest_digest, code = _manifest(args)
        if args.json:
            return 0
    measurement: bytes | None = None
    registers: dict[str, bytes] = {}
    platform = ""
    if args.launch != "tdx" and (args.memory is not None or args.acpi_tables is not None):
        raise ConfigError("measure: --memory and --acpi-tables are for --launch tdx")
    if args.launch == "tdx":
        platform, registers = "tdx", _tdx(args)
    elif args.launch is not None:
        platform, measurement = _launch(args, code)
        print(f"launch measurement ({platform})  {measurement.hex()}")
    if args.policy_out:
        if measurement is None and not registers:
            raise ConfigError(
                "measure --policy-out: a policy needs the launch measurement: add --launch "
                "sev-snp or tdx (with the guest's --ovmf/--kernel/--initrd/--append) or "
                "--launch simulated; a manifest digest alone is the workload's self-report"
            )
        from sealserve.attestation.launch import reference_policy

        text = reference_policy(
            platform=platform,
            measurement=measurement,
            registers=registers,
            manifest_digest=manifest_digest,
            min_tcb=_min_tcb(args.min_tcb),
            min_tee_tcb_svn=args.min_tee_tcb_svn,
        )
        args.policy_out.write_text(text)
        print(f"\nwrote {args.policy_out}")
    return 0


def _manifest(args: argparse.Namespace) -> tuple[bytes, str]:
    from sealserve.enclave.manifest import code_digest
    from sealserve.server.manifest import (
        build_manifest,
        expected_hardening,
        measure_entries,
        simulated_measurement,
    )
    from sealserve.server.repository import scan_repository
    from sealserve.server.settings import Settings

    settings = Settings.load(args.config)
    code = code_digest()
    models = measure_entries(scan_repository(settings.model_repository))
    # The config and the build alone: keys the server makes at its first start (the
    # audit key) are attested beside the manifest, in the runtime keys record.
    manifest = build_manifest(settings, models, code=code, hardening=expected_hardening(settings))
    digest = manifest.digest()
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        return digest, code
    print(f"manifest sha256           {digest.hex()}")
    print(f"code digest               {code}")
    print(f"simulated measurement     {simulated_measurement(code).hex()}")
    for m in models:
        print(f"model {m.name} v{m.version:<6}      sha256 {m.sha256}")
    print("\npolicy snippet:")
    print(f'manifest_digests = ["{digest.hex()}"]')
    return digest, code


def _launch(args: argparse.Namespace, code: str | None) -> tuple[str, bytes]:
    if args.launch == "simulated":
        from sealserve.enclave.manifest import code_digest
        from sealserve.server.manifest import simulated_measurement

        return "simulated-sev-snp", simulated_measurement(code or code_digest())
    from sealserve.attestation.launch import (
        DEFAULT_GUEST_FEATURES,
        SnpLaunch,
        snp_launch_measurement,
    )

    if args.ovmf is None:
        raise ConfigError("measure --launch sev-snp needs --ovmf (the guest's firmware)")
    spec = SnpLaunch(
        **_boot_parts(args),
        vcpus=args.vcpus,
        vcpu_type=args.vcpu_type,
        guest_features=(
            DEFAULT_GUEST_FEATURES if args.guest_features is None else args.guest_features
        ),
        vmm=args.vmm,
    )
    return "sev-snp", snp_launch_measurement(spec)


def _boot_parts(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("ovmf", "kernel", "initrd", "append")}


def _tdx(args: argparse.Namespace) -> dict[str, bytes]:
    from sealserve.attestation.tdx_launch import TdxLaunch, tdx_launch_registers

    if args.ovmf is None:
        raise ConfigError("measure --launch tdx needs --ovmf (the TD's OVMF/TDVF firmware)")
    if args.acpi_tables is not None and args.memory is None:
        raise ConfigError("measure: --acpi-tables needs --memory (the TD's memory in MiB)")
    spec = TdxLaunch(
        **_boot_parts(args), page_order=args.tdx_page_order, memory_mib=args.memory,
        acpi_tables=args.acpi_tables,
    )  # fmt: skip
    computed = tdx_launch_registers(spec)
    given = {r: getattr(args, r) for r in ("rtmr0", "rtmr1", "rtmr2") if getattr(args, r)}
    out = {**computed, **given}
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
        how = "computed" if name in computed and name not in given else "given"
        value = (
            out[name].hex() if name in out
            else "not computed (give --memory/--acpi-tables or pass it, see docs/tdx.md)"
        )  # fmt: skip
        print(f"tdx {name:<6} {how if name in out else '':<8}  {value}")
    return out


def _tee_tcb_svn(text: str) -> bytes:
    return _hex_arg(text, 16)


def _register(text: str) -> bytes:
    return _hex_arg(text, 48)


def _hex_arg(text: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not hex: {text[:20]!r} ({len(text)} chars)") from exc
    if len(raw) != size:
        raise argparse.ArgumentTypeError(f"expected {size} bytes ({2 * size} hex), got {len(raw)}")
    return raw


def _min_tcb(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    from sealserve.attestation.policy import TCB_COMPONENTS

    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in TCB_COMPONENTS or not value.isdigit():
            raise ConfigError(
                f"--min-tcb: expected name=number pairs ({', '.join(TCB_COMPONENTS)}), "
                f"got {part[:40]!r}"
            )
        out[name] = int(value)
    if not out:
        raise ConfigError("--min-tcb: give at least one component (a floor of nothing passes)")
    return out
