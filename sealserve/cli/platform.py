"""``sealserve platform``: manage the simulated attestation platform (dev and tests)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "platform",
        help="create a simulated SEV-SNP platform for development",
        description=(
            "The simulated platform signs reports in the SEV-SNP layout with a local "
            "ARK -> ASK -> VCEK chain. Its evidence is labelled SIMULATED everywhere and "
            "passes only policies that set unsafe_allow_simulated and trust its root."
        ),
    )
    psub = p.add_subparsers(dest="platform_command", metavar="ACTION", required=True)
    init = psub.add_parser("init-simulated", help="create the simulated root in DIR (once)")
    init.add_argument("directory", type=Path, help="where to write the simulated root (created)")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    from sealserve.enclave.simulated import SimulatedPlatform

    SimulatedPlatform.create_root(args.directory)
    print(f"simulated SEV-SNP platform created in {args.directory}")
    print("  it is NOT a TEE: use it for development and tests only")
    print(f'  server:   simulated_platform_dir = "{args.directory}"')
    print(f"  verifier: sealserve verify --simulated-root {args.directory} ...")
    return 0
