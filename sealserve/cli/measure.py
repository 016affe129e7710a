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
            "With --config: computes, from this installed build and the config, exactly "
            "the workload manifest the server will attest to (code digest, measured "
            "config, model digests) and prints its SHA-256. With --launch: the expected "
            "hardware launch measurement of a guest built from the given parts (sev-snp: "
            "OVMF, kernel, initrd, command line, vCPUs; simulated: this build). "
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
    launch.add_argument("--ovmf", type=Path, help="sev-snp: the OVMF firmware (AmdSev build)")
    launch.add_argument("--kernel", type=Path, help="sev-snp: the kernel (measured direct boot)")
    launch.add_argument("--initrd", type=Path, help="sev-snp: the initrd")
    launch.add_argument("--append", help="sev-snp: the kernel command line")
    launch.add_argument("--vcpus", type=int, default=1, help="sev-snp: vCPU count (default 1)")
    launch.add_argument("--vcpu-type", default="EPYC-v4", help="sev-snp: QEMU CPU model")
    launch.add_argument(
        "--guest-features",
        type=lambda x: int(x, 0),
        default=None,
        help="sev-snp: SEV_FEATURES word of the VMSA (default 0x1)",
    )
    launch.add_argument("--vmm", choices=("qemu", "ec2", "gce"), default="qemu")
    launch.add_argument(
        "--min-tcb",
        help="TCB floor for --policy-out, e.g. bl=4,snp=22,ucode=217 (default bl=3,snp=8)",
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
    platform = ""
    if args.launch is not None:
        platform, measurement = _launch(args, code)
        print(f"launch measurement ({platform})  {measurement.hex()}")
    if args.policy_out:
        if measurement is None:
            raise ConfigError(
                "measure --policy-out: a policy needs the launch measurement: add --launch "
                "sev-snp (with the guest's --ovmf/--kernel/--initrd/--append/--vcpus) or "
                "--launch simulated; a manifest digest alone is the workload's self-report"
            )
        from sealserve.attestation.launch import reference_policy

        text = reference_policy(
            platform=platform,
            measurement=measurement,
            manifest_digest=manifest_digest,
            min_tcb=_min_tcb(args.min_tcb),
        )
        args.policy_out.write_text(text)
        print(f"\nwrote {args.policy_out}")
    return 0


def _manifest(args: argparse.Namespace) -> tuple[bytes, str]:
    from sealserve.defense.audit.log import load_public_key, public_key_fingerprint
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
    extra = {}
    defense = settings.defense
    if defense is not None and defense.audit.enabled:
        pem = defense.state_dir / "audit-public.pem" if defense.state_dir else None
        if pem is not None and pem.is_file():
            extra["audit_public_key"] = public_key_fingerprint(load_public_key(pem.read_bytes()))
        else:
            print("warning: the audit key is made at the server's first start; run measure "
                  "again afterwards (it reads defense.state_dir/audit-public.pem)")  # fmt: skip
    manifest = build_manifest(
        settings, models, code=code, hardening=expected_hardening(settings), extra=extra
    )
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
    if args.launch == "tdx":
        raise ConfigError(
            "measure --launch tdx: MRTD and RTMR0..2 also depend on the VMM's ACPI tables "
            "and no maintained Python package computes them; run `tdx-measure` (see "
            "docs/deploy.md) and pin its mrtd, rtmr0, rtmr1 and rtmr2 in [tdx]"
        )
    from sealserve.attestation.launch import (
        DEFAULT_GUEST_FEATURES,
        SnpLaunch,
        snp_launch_measurement,
    )

    if args.ovmf is None:
        raise ConfigError("measure --launch sev-snp needs --ovmf (the guest's firmware)")
    spec = SnpLaunch(
        ovmf=args.ovmf,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        vcpus=args.vcpus,
        vcpu_type=args.vcpu_type,
        guest_features=(
            DEFAULT_GUEST_FEATURES if args.guest_features is None else args.guest_features
        ),
        vmm=args.vmm,
    )
    return "sev-snp", snp_launch_measurement(spec)


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
