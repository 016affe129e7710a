"""``sealserve measure``: the reference values an auditor expects from a build + config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "measure",
        help="print the workload manifest and reference values for a config",
        description=(
            "Computes, from this installed build and --config, exactly the workload "
            "manifest the server will attest to: code digest, measured config, model "
            "digests. Prints its SHA-256 (for a policy's manifest_digests) and the "
            "simulated platform's measurement."
        ),
    )
    p.add_argument("--config", type=Path, required=True, help="server settings (TOML)")
    p.add_argument("--json", action="store_true", help="print the manifest itself (JSON)")
    p.add_argument("--policy-out", type=Path, help="write a starter policy file pinning it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    defense = settings.defense_config()
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
    digest = manifest.digest().hex()
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        return 0
    print(f"manifest sha256           {digest}")
    print(f"code digest               {code}")
    print(f"simulated measurement     {simulated_measurement(code).hex()}")
    for m in models:
        print(f"model {m.name} v{m.version:<6}      sha256 {m.sha256}")
    print("\npolicy snippet:")
    print(f'manifest_digests = ["{digest}"]')
    if args.policy_out:
        args.policy_out.write_text(
            "# Written by `sealserve measure`: pins this build + config.\n"
            f'version = 1\nmanifest_digests = ["{digest}"]\n'
        )
        print(f"\nwrote {args.policy_out}")
    return 0
