"""``sealserve redteam``: run extraction attacks against a deployment, as an outsider."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sealserve.cli._connect import add_connection_args, refuse_secret

#: Where the admin-scope token comes from without --admin-token-file.
ADMIN_TOKEN_ENV = "SEALSERVE_ADMIN_TOKEN"  # noqa: S105 (a variable name)
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
            "bundled digits demo) on held-out inputs (the demo's holdout set). "
            "`rotation` spreads over every account; each other attack takes the next "
            "account no earlier attack used (all of them with --spread)."
        ),
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the server's gRPC port")
    p.add_argument("--attack", action="append", choices=[*ATTACKS, "all"], default=[],
                   help="attack to run (repeatable; default all)")  # fmt: skip
    p.add_argument(
        "--budget", type=int, default=1000, help="queries per attack (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)"
    )
    p.add_argument(
        "--connections", type=int, default=1, help="connections per account (default: %(default)s)"
    )
    p.add_argument(
        "--batch", type=int, default=1, help="input rows per request (default: %(default)s)"
    )
    p.add_argument("--spread", action="store_true",
                   help="every attack rotates over every token, not only `rotation`")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=5.0,
                   help="longest retry-after worth waiting, else drop the account "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="wall-clock cap per attack (seconds) (default: %(default)s)")  # fmt: skip
    p.add_argument("--model", default="digits",
                   help="the model to attack, as served (default: %(default)s)")  # fmt: skip
    p.add_argument("--victim-onnx", type=Path,
                   help="the unperturbed model for ground truth (owner only)")  # fmt: skip
    p.add_argument("--admin-token-file", type=Path, metavar="FILE",
                   help="an admin-scope token: also read each attacker account's "
                   f"server-side status (default: ${ADMIN_TOKEN_ENV} if set)")  # fmt: skip
    p.add_argument("--tier", default="",
                   help="the attackers' tier (the tier of the --token-file accounts), for "
                   "the server-side status lookup")  # fmt: skip
    p.add_argument("--honest", type=int, default=0, metavar="N",
                   help="also measure N honest users, reusing the tokens in turn (default: 0, "
                   "none)")  # fmt: skip
    p.add_argument(
        "--honest-queries",
        type=int,
        default=10,
        help="held-out inputs per user (default: %(default)s)",
    )
    p.add_argument(
        "--honest-rate",
        type=float,
        default=1.0,
        help="requests/s per honest user (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the attacks' inputs (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("redteam-report"),
                   help="directory for the report (default: %(default)s)")  # fmt: skip
    add_connection_args(p, token=False)
    # Tokens never on the command line (ps, shell history): a file, or the environment.
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file with one attacker token per line; each attack but `rotation` "
                   "takes the next unused account (default: $SEALSERVE_TOKEN, one "
                   "token)")  # fmt: skip
    refuse_secret(p, "--token", instead="--token-file FILE or $SEALSERVE_TOKEN")
    refuse_secret(p, "--admin-token", instead=f"--admin-token-file FILE or ${ADMIN_TOKEN_ENV}")
    p.set_defaults(func=run)


def _tokens(args: argparse.Namespace) -> list[str]:
    from sealserve.cli._connect import TOKEN_ENV
    from sealserve.errors import ConfigError

    if args.token_file is None:
        single = os.environ.get(TOKEN_ENV, "").strip()
        return [single] if single else []
    try:
        lines = args.token_file.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {args.token_file}: {exc.strerror}") from exc
    return [t.strip() for t in lines if t.strip() and not t.startswith("#")]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sealserve.cli._connect import connection_kwargs, read_token_file
    from sealserve.errors import ConfigError
    from sealserve.redteam import report
    from sealserve.redteam.attacks import all_attacks
    from sealserve.redteam.metrics import Evaluation, honest_utility, plan_accounts, run_attack
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
    known = all_attacks(args.seed)
    attacks = [
        replace(known[n], accounts=None) if args.spread else known[n]  # type: ignore[type-var]
        for n in names
    ]
    plans, reused = plan_accounts(attacks, accounts)
    for line in reused:
        print(f"warning: {line}", flush=True)
    admin_token = read_token_file(args.admin_token_file, env=ADMIN_TOKEN_ENV)
    runs = []
    for attack, use in zip(attacks, plans, strict=True):
        name = attack.name
        print(f"{name}: budget {args.budget}, accounts {', '.join(a.name for a in use)}",
              flush=True)  # fmt: skip
        m = run_attack(
            attack, args.target, use, budget=args.budget, evaluation=evaluation,
            config=cfg, client_kwargs=kw, admin_token=admin_token, tier=args.tier,
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
