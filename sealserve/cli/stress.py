"""``sealserve stress``: the rate-limit stress test for your own deployment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealserve.cli._connect import add_connection_args

if TYPE_CHECKING:
    from sealserve.defense.config import DefenseConfig


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "stress",
        help="hammer your own endpoints with many accounts; report any over-admission",
        description=(
            "Mints a token per account with your issuer key, opens --connections "
            "connections spread over the --target endpoints (replicas), sends inference "
            "requests for --duration seconds, and reports per account: admitted vs the "
            "most its tier allows in that time, over-admissions, refusal codes. Exits 1 "
            "on any over-admission or unaccounted request."
        ),
    )
    p.add_argument("--target", action="append", required=True, metavar="HOST:PORT",
                   help="an endpoint (repeat for several replicas)")  # fmt: skip
    p.add_argument("--config", type=Path, required=True,
                   help="the servers' settings (for [auth] audience/ToS and [limits])")  # fmt: skip
    p.add_argument("--issuer-key", type=Path, required=True, help="token signing key (PEM)")
    p.add_argument("--issuer", required=True, help="the issuer name configured in [auth]")
    p.add_argument("--tier", required=True, help="tier of the stress accounts")
    p.add_argument("--accounts", type=int, default=10,
                   help="accounts to mint tokens for (default: %(default)s)")  # fmt: skip
    p.add_argument("--connections", type=int, default=50,
                   help="connections in all, over the targets (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds, at most 600 (default: %(default)s)"
    )
    p.add_argument("--model", default="digits", help="model to call (default: %(default)s)")
    p.add_argument("--account-prefix", default="stress-",
                   help="accounts are named PREFIX000, ... (default: %(default)s)")  # fmt: skip
    add_connection_args(p, token=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np

    from sealserve.auth import TokenIssuer
    from sealserve.cli._connect import connection_kwargs
    from sealserve.client import Client
    from sealserve.errors import ConfigError
    from sealserve.redteam.stress import Endpoint, run_stress
    from sealserve.server.settings import Settings

    settings = Settings.load(args.config)
    auth = settings.auth
    limits = settings.limits
    if auth is None:
        raise ConfigError("stress needs a server with [auth] (accounts come from tokens)")
    issuer = TokenIssuer.from_pem(
        args.issuer_key.read_bytes(), issuer=args.issuer, audience=auth.audience
    )
    accounts = [f"{args.account_prefix}{i:03d}" for i in range(args.accounts)]
    tokens = {
        a: issuer.issue(a, tier=args.tier, scopes=["infer", "metadata"],
                        tos_version=auth.required_tos_version, ttl=args.duration + 600)
        for a in accounts
    }  # fmt: skip
    kw = connection_kwargs(args)
    endpoints, inputs = [], None
    for target in args.target:
        with Client(target, token=tokens[accounts[0]], **kw) as c:
            cert = None
            if c.attestation is not None:
                cert = c.attestation.certificate_pem
            elif "root_certificates" in kw:
                cert = kw["root_certificates"]
            endpoints.append(Endpoint(target, cert))
            if inputs is None:
                meta = c.model_metadata(args.model)
                inputs = {
                    t.name: np.zeros([1 if d < 0 else d for d in t.shape], _dtype(t.datatype))
                    for t in meta.inputs
                }
    assert inputs is not None
    warning = defense_warning(settings.defense, model=args.model, tier=args.tier, accounts=accounts)
    if warning:
        print(warning, flush=True)
    tier = limits.tier(args.tier) if limits is not None else None
    print(f"stress: {len(accounts)} accounts x {args.connections} connections on "
          f"{len(endpoints)} endpoint(s) for {args.duration:g} s ...", flush=True)  # fmt: skip
    report = asyncio.run(
        run_stress(
            endpoints, tokens, model=args.model, inputs=inputs, connections=args.connections,
            duration=args.duration, tiers={a: tier for a in accounts} if tier else None,
        )
    )  # fmt: skip
    print(report.render())
    return 0 if report.over_admissions == 0 and report.consistent else 1


def defense_warning(
    defense: DefenseConfig | None, *, model: str, tier: str, accounts: list[str]
) -> str | None:
    """One line, before any request, when ``model`` is defended: the stress accounts
    look like extraction to the detector, so they will be throttled or suspended and
    their requests will fill the audit log and its report."""
    if defense is None or model not in defense.models:
        return None
    return (
        f"warning: [defense] is on for {model!r}: the stress accounts ({accounts[0]}.."
        f"{accounts[-1]}, tier {tier!r}) will be throttled or suspended by detection and "
        "will fill the audit log and `audit report`; give them a tier and --account-prefix "
        "of their own and `sealserve admin forgive` them afterwards"
    )


def _dtype(datatype: str) -> Any:
    from sealserve.tensors import OIP_TO_NUMPY

    return OIP_TO_NUMPY[datatype]
