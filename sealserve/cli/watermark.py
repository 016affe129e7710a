"""``sealserve watermark verify``: prove a suspect model was trained on our answers
(DAWN marks, signal tilt and band marks; ``--json`` holds each test)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sealserve.cli._connect import add_connection_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "watermark",
        help="verify the watermark on a suspect model (ONNX file or OIP endpoint)",
        description=(
            "Replays the watermark ledger's marked inputs to a suspect, counts how often "
            "it reproduces the watermark answers (match rate, the rate expected by "
            "chance, one-sided binomial test), replays the ledger's boundary probes to "
            "test for the keyed signal tilt (an exact Gaussian test), replays the recorded "
            "band rows (labels only) for the band-marks test (an exact binomial test), "
            "and reports each with a combined (Bonferroni) p-value and a verdict."
        ),
    )
    actions = p.add_subparsers(dest="watermark_action", metavar="ACTION", required=True)
    v = actions.add_parser("verify", help="test a suspect against the ledger")
    add_ledger_args(v)
    add_suspect_args(v)
    v.add_argument("--account", help="only this account's watermarked queries")
    v.add_argument(
        "--alpha",
        type=float,
        default=1e-6,
        help="verdict threshold: a claim when p < alpha (default: %(default)g)",
    )
    v.add_argument(
        "--signal-probes", type=int, default=1000, metavar="N",
        help="boundary probes replayed for the signal test, nearest first (default 1000)",
    )  # fmt: skip
    v.add_argument(
        "--band-pool", choices=("fit", "all"), default="fit",
        help="band test: pool the accounts on which the suspect's top-1 fit is high "
        "(fit, coin-free, the default) or every account (all)",
    )  # fmt: skip
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=run_verify)


def add_ledger_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ledger (sealed by the server's platform)")
    g.add_argument(
        "--ledger", type=Path, required=True, action="append",
        help="defense.state_dir/watermark-ledger, or defense.state_dir itself: every "
        "ledger in it (one per worker process) read as one; repeatable",
    )  # fmt: skip
    g.add_argument(
        "--platform", choices=("simulated", "configfs-tsm"), default="simulated",
        help="the platform that sealed it (configfs-tsm: run inside the same TEE; "
        "default: %(default)s)",
    )  # fmt: skip
    # The simulated platform's directory is --simulated-root (a connection option too).


def add_suspect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--suspect", type=Path, help="suspect model (ONNX file)")
    g.add_argument("--suspect-endpoint", metavar="HOST:PORT", help="suspect OIP endpoint")
    p.add_argument(
        "--model",
        default="digits",
        help="model name at the suspect endpoint (default: %(default)s)",
    )
    add_connection_args(p)


def open_ledger(args: argparse.Namespace) -> Any:
    """Unseal the ledger with the platform's sealing key (bound to the measurement)."""
    from sealserve.defense.watermark.ledger import WatermarkLedger
    from sealserve.enclave.manifest import code_digest
    from sealserve.enclave.sealed_state import SealedBox
    from sealserve.errors import ConfigError

    label = b"sealserve/watermark-ledger/v1"
    if args.platform == "simulated":
        from sealserve.enclave.simulated import SimulatedPlatform
        from sealserve.server.manifest import simulated_measurement

        if not args.simulated_root:
            raise ConfigError("--platform simulated needs --simulated-root DIR")
        platform: Any = SimulatedPlatform(
            args.simulated_root[0], measurement=simulated_measurement(code_digest())
        )
    else:
        from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform

        platform = ConfigfsTsmPlatform()
    box = SealedBox(platform.sealing_key(label))
    from sealserve.defense.audit.state import ledger_files, unwrap_versioned

    files: list[Path] = []
    for item in args.ledger:
        if item.is_dir():
            found = ledger_files(item)
            if not found:
                raise ConfigError(f"{item} holds no watermark-ledger files")
            files.extend(found)
        else:
            files.append(item)
    ledgers = []
    for path in files:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read ledger {path}: {exc.strerror}") from exc
        # The sealed payload carries the ledger's version (bound into the audit log) first.
        ledgers.append(WatermarkLedger.from_sealed(
            blob, unseal=lambda b: unwrap_versioned(box.unseal(b, label=label))[1]
        ))  # fmt: skip
    return ledgers[0] if len(ledgers) == 1 else WatermarkLedger.union(ledgers)


def open_suspect(args: argparse.Namespace) -> tuple[Any, Any]:
    """(predict callable, closer) for --suspect or --suspect-endpoint."""
    if args.suspect is not None:
        from sealserve.defense.watermark.suspect import OnnxSuspect

        return OnnxSuspect(args.suspect), lambda: None
    from sealserve.cli._connect import connection_kwargs, token_from
    from sealserve.client import Client
    from sealserve.client.suspect import EndpointSuspect

    client = Client(args.suspect_endpoint, token=token_from(args), **connection_kwargs(args))
    return EndpointSuspect(client, args.model), client.close


def run_verify(args: argparse.Namespace) -> int:
    from sealserve.defense.watermark.verify import verify

    ledger = open_ledger(args)
    suspect, close = open_suspect(args)
    try:
        report = verify(ledger, suspect, account=args.account, alpha=args.alpha,
                        signal_probes=args.signal_probes, band_pool=args.band_pool)  # fmt: skip
    finally:
        close()
    if args.json:
        print(json.dumps(json.loads(report.to_json()), indent=2))
    else:
        print(report.render())
    return 0
