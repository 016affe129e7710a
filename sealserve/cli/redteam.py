"""``sealserve redteam``: run extraction attacks against a deployment, as an outsider."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealserve.cli._connect import add_connection_args

ATTACKS = ("equation", "random", "jacobian", "knockoff", "averaging", "rotation")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "redteam",
        help="run model-extraction attacks against an endpoint and report what they got",
        description=(
            "Attacks --target through the public SDK with the given tokens (one per "
            "attacker account), trains replicas on the answers, and writes a report "
            "(report.md, metrics.json, fidelity.png) to --out. Fidelity is measured "
            "against the unperturbed model run locally (--victim-onnx; default: the "
            "bundled digits demo) on held-out inputs (the demo's holdout set). Only "
            "`rotation` spreads over every token; other attacks use the first token "
            "unless --spread."
        ),
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--attack", action="append", choices=[*ATTACKS, "all"], default=[],
                   help="attack to run (repeatable; default all)")  # fmt: skip
    p.add_argument("--budget", type=int, default=1000, help="queries per attack")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--connections", type=int, default=1, help="connections per account")
    p.add_argument("--batch", type=int, default=1, help="input rows per request")
    p.add_argument("--spread", action="store_true",
                   help="every attack rotates over every token, not only `rotation`")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=5.0,
                   help="longest retry-after worth waiting (else drop the account)")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="wall-clock cap per attack (seconds)")  # fmt: skip
    p.add_argument("--model", default="digits")
    p.add_argument("--victim-onnx", type=Path,
                   help="the unperturbed model for ground truth (owner only)")  # fmt: skip
    p.add_argument("--admin-token", help="also read each account's server-side status")
    p.add_argument("--tier", default="", help="tier for the admin status lookup")
    p.add_argument("--honest", type=int, default=0, metavar="N",
                   help="also measure N honest users (reuses the tokens in turn)")  # fmt: skip
    p.add_argument("--honest-queries", type=int, default=10, help="held-out inputs per user")
    p.add_argument("--honest-rate", type=float, default=1.0, help="requests/s per honest user")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("redteam-report"))
    add_connection_args(p, token=False)
    p.add_argument("--token", action="append", default=[],
                   help="an attacker account's bearer token (repeatable)")  # fmt: skip
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file with one attacker token per line (adds to --token)")  # fmt: skip
    p.set_defaults(func=run)


def _tokens(args: argparse.Namespace) -> list[str]:
    tokens: list[str] = list(args.token or [])
    if args.token_file is not None:
        lines = args.token_file.read_text().splitlines()
        tokens += [t.strip() for t in lines if t.strip() and not t.startswith("#")]
    return tokens


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sealserve.cli._connect import connection_kwargs
    from sealserve.errors import ConfigError
    from sealserve.redteam import report
    from sealserve.redteam.attacks import all_attacks
    from sealserve.redteam.metrics import Evaluation, honest_utility, run_attack
    from sealserve.redteam.oracle import Account, OracleConfig
    from sealserve.redteam.replica import GroundTruth

    if args.budget < 1:
        raise ConfigError("--budget must be at least 1")
    tokens = _tokens(args)
    accounts = [Account.from_token(t, default=f"account-{i}") for i, t in enumerate(tokens)]
    if not accounts:
        accounts = [Account("anonymous", None)]  # a server with auth disabled
    evaluation = Evaluation.demo()
    if args.victim_onnx is not None:
        truth = GroundTruth(args.victim_onnx).predict_proba(evaluation.x)
        evaluation = Evaluation(evaluation.x, evaluation.y, truth)
    kw = connection_kwargs(args)
    cfg = OracleConfig(model=args.model, concurrency=args.concurrency, batch=args.batch,
                       connections=args.connections, max_wait=args.max_wait,
                       time_limit=args.time_limit)  # fmt: skip
    names = list(ATTACKS) if not args.attack or "all" in args.attack else args.attack
    attacks = all_attacks(args.seed)
    runs = []
    for name in names:
        attack = attacks[name]
        if args.spread:
            attack = replace(attack, accounts=None)  # type: ignore[type-var]
        print(f"{name}: budget {args.budget}", flush=True)
        m = run_attack(
            attack, args.target, accounts, budget=args.budget, evaluation=evaluation,
            config=cfg, client_kwargs=kw, admin_token=args.admin_token, tier=args.tier,
            progress=lambda s: print(s, flush=True),
        )  # fmt: skip
        print(f"{name}: {m.admitted}/{m.sent} admitted, fidelity {m.fidelity:.3f}, "
              f"accuracy {m.accuracy:.3f}, first refusal at {m.first_detection}, "
              f"{m.stopped_because}", flush=True)  # fmt: skip
        runs.append(m)
    honest = None
    if args.honest > 0:
        users = [tokens[i % len(tokens)] if tokens else None for i in range(args.honest)]
        honest = honest_utility(
            args.target, users, evaluation, per_account=args.honest_queries,
            rate=args.honest_rate, model=args.model, client_kwargs=kw,
        )  # fmt: skip
        print(f"honest users: agreement {honest.agreement:.4f}, "
              f"refused accounts {honest.refused_accounts}", flush=True)  # fmt: skip
    path = report.write(runs, args.out, target=args.target, honest=honest)
    print(f"report: {path}")
    return 0
