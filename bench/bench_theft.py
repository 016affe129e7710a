#!/usr/bin/env python3
"""Theft-resistance benchmark: every red-team attack against the demo model served
twice on loopback, once with defenses off and once with the default profile.

    python bench/bench_theft.py [--quick] [--budgets 1000,5000,20000]
                                [--attacks all] [--time-limit 40] [--honest 100]

Each deployment is `python -m sealserve serve --config ...` with [auth] (a local
JWKS; tokens minted here with sealserve.auth.TokenIssuer). The defended one appends
bench/theft_defended.toml ([limits] and, once wired, [defense]). Each attack runs once
per deployment at the largest budget with fresh accounts (rotation: 10 accounts x 2
connections), checkpointing its replica at every budget: the row for a smaller budget
is the replica the same attacker held after that many answers (a prefix of the same
run; identical to a separate run for every attack but the last round of Jacobian
augmentation). A defended run also stops at --time-limit seconds of wall clock: the
replica it holds then is the one measured. 100 honest accounts then send held-out
digits at 1 request/s. Writes bench/THEFT.md (and bench/theft/*.png, *.json).

The watermark p-value needs the owner's verifier: --watermark MODULE:FUNC names a
function ``FUNC(config_path: Path) -> WatermarkCheck | None`` (see
sealserve.redteam.metrics.WatermarkCheck); without it the column says n/a.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sealserve import demo  # noqa: E402
from sealserve.auth import TokenIssuer, generate_keypair  # noqa: E402
from sealserve.enclave.simulated import SimulatedPlatform  # noqa: E402
from sealserve.redteam.attacks import all_attacks, with_marks  # noqa: E402
from sealserve.redteam.metrics import (  # noqa: E402
    Evaluation,
    HonestUtility,
    RunMetrics,
    WatermarkCheck,
    honest_utility,
    run_attack,
)
from sealserve.redteam.oracle import Account, OracleConfig  # noqa: E402
from sealserve.redteam.report import plot, plot_pairs  # noqa: E402

ISS, AUD, TOS = "https://issuer.bench.invalid", "sealserve-bench", "2026-11"
HERE = Path(__file__).resolve().parent
PLAIN = {"unsafe_plaintext": True}
TIER = "free"


class Deployment:
    """One `sealserve serve` process with [auth] (+ ``extra`` config) on loopback."""

    def __init__(self, name: str, extra: str) -> None:
        self.name = name
        self.tmp = Path(tempfile.mkdtemp(prefix=f"theft-{name}-"))
        pem, jwks = generate_keypair("ES256")
        (self.tmp / "jwks.json").write_text(json.dumps(jwks))
        self.issuer = TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)
        shutil.copytree(demo.repository(), self.tmp / "models")
        self.config = self.tmp / "sealserve.toml"
        plat = 'attestation_platform = "none"\n'
        if "{REFERENCE}" in extra:
            # The defended deployment seals its watermark ledger: it needs a platform.
            SimulatedPlatform.create_root(self.tmp / "platform")
            plat = 'attestation_platform = "simulated"\nsimulated_platform_dir = "platform"\n'
            extra = extra.replace("{REFERENCE}", str(demo.reference_path()))
        self.config.write_text(
            'model_repository = "models"\nport = 0\nunsafe_plaintext = true\n'
            'log_format = "text"\n' + plat + 'state_store = "sqlite://state.db"\n'
            f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
            f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n\n' + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.target = ""

    def token(self, account: str, scopes: tuple[str, ...] = ("infer",)) -> str:
        return self.issuer.issue(account, tier=TIER, scopes=list(scopes), tos_version=TOS,
                                 ttl=6 * 3600)  # fmt: skip

    def start(self) -> str:
        ready = self.tmp / "ready.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log = (self.tmp / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sealserve", "serve", "--config", str(self.config),
             "--ready-file", str(ready)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} server failed:\n{self.log()}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        return self.target

    def log(self) -> str:
        return (self.tmp / "server.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Profile:
    name: str
    runs: dict[str, RunMetrics]
    honest: HonestUtility
    elapsed: float = 0.0


def _load(path: Path, name: str) -> Profile:
    d = json.loads(path.read_text())
    runs = {k: RunMetrics.from_dict(v) for k, v in d["runs"].items()}
    return Profile(name, runs, HonestUtility(**d["honest"]), float(d.get("elapsed", 0.0)))


def run_profile(
    dep: Deployment,
    args: argparse.Namespace,
    evaluation: Evaluation,
    watermark: WatermarkCheck | None,
    time_limit: float,
) -> Profile:
    target = dep.start()
    print(f"[{dep.name}] serving on {target}", flush=True)
    admin = dep.token("bench-operator", scopes=("admin",))
    runs: dict[str, RunMetrics] = {}
    budgets = args.budgets
    attacks = all_attacks(seed=0)
    for name in args.attacks:
        attack = with_marks(attacks[name], tuple(budgets))
        n_accounts = args.rotation_accounts if attack.accounts is None else 1
        accounts = [Account(f"{name}-{i}", dep.token(f"{name}-{i}")) for i in range(n_accounts)]
        t0 = time.monotonic()
        m = run_attack(
            attack, target, accounts, budget=max(budgets), evaluation=evaluation,
            config=OracleConfig(concurrency=args.concurrency, batch=args.batch,
                                max_wait=args.max_wait, time_limit=time_limit),
            client_kwargs=PLAIN, watermark_pvalue=watermark, admin_token=admin, tier=TIER,
        )  # fmt: skip
        runs[name] = m
        print(f"[{dep.name}] {name}: {m.admitted}/{m.sent} admitted in {m.elapsed_s:.0f} s "
              f"({m.admitted_rate:.0f}/s), fidelity {m.fidelity:.3f}, first refusal "
              f"{m.first_detection}, {m.stopped_because} [{time.monotonic() - t0:.0f} s]",
              flush=True)  # fmt: skip
    users = [dep.token(f"honest-{i:03d}") for i in range(args.honest)]
    honest = honest_utility(target, users, evaluation, per_account=args.honest_queries,
                            rate=1.0, client_kwargs=PLAIN)  # fmt: skip
    print(f"[{dep.name}] honest: agreement {honest.agreement:.4f}, refused accounts "
          f"{honest.refused_accounts}/{honest.accounts}", flush=True)  # fmt: skip
    dep.stop()
    return Profile(dep.name, runs, honest)


def _at(m: RunMetrics, budget: int) -> float | None:
    """Fidelity of the replica held after ``budget`` answers (or when stopped)."""
    return m.fidelity_at(budget) if m.admitted >= budget else m.fidelity


def _flag_at(m: RunMetrics) -> int | None:
    """Requests sent before the attacker was flagged: the first challenge or suspension
    it saw (a quota refusal is not a flag: every account of the tier gets those). For
    rotation, the latest over its accounts (the target is per account). None: never."""
    per_account: list[int | None] = []
    for firsts in m.first_events_per_account.values():
        flags = [v for k, v in firsts.items() if k in ("challenge", "suspend")]
        per_account.append(min(flags) if flags else None)
    if not per_account or any(f is None for f in per_account):
        return None
    return max(f for f in per_account if f is not None)


def _server_flagged(m: RunMetrics) -> list[str]:
    """Accounts whose server-side status was not normal after the run (Admin)."""
    return [a for a, st in m.server_status.items()
            if isinstance(st, dict) and st.get("kind", "normal") not in ("normal", "ok")]  # fmt: skip


def _q(v: int | None) -> str:
    return "never" if v is None else str(v)


def day_quota(profile_text: str) -> int | None:
    """Queries one account of the bench's tier may make per day under the profile."""
    import tomllib

    tier = tomllib.loads(profile_text).get("limits", {}).get("tiers", {}).get(TIER, {})
    per_day = tier.get("per_day")
    return int(per_day) if per_day else None


def targets(und: RunMetrics, d: RunMetrics, top: int, per_day: int | None) -> tuple[str, str, str]:
    """(flagged < 1k, suspended or throttled < 5k, replica) verdicts for one attack."""
    flag = _flag_at(d)
    server = _server_flagged(d)
    if flag is not None and flag < 1000:
        det = f"met (at {flag})"
    elif server and len(server) == len(d.server_status):
        det = "flagged server-side by the end (query count unknown)"
    else:
        det = f"missed (client saw no flag; {len(server)} accounts flagged server-side)"
    susp = d.first_suspension is not None and d.first_suspension < 5000
    throttled = und.admitted_rate > 0 and d.admitted_rate <= 0.1 * und.admitted_rate
    if susp:
        stop = f"met (suspended at {d.first_suspension})"
    elif throttled:
        why = "quota only" if flag is None else "after flag"
        stop = f"met ({d.admitted_rate:.1f}/s vs {und.admitted_rate:.0f}/s, {why})"
    else:
        stop = f"missed ({d.admitted_rate:.1f}/s vs {und.admitted_rate:.0f}/s undefended)"
    # The replica held when stopped: at suspension, the replica the run ended with.
    # Throttling only delays: an attacker that keeps its accounts gets a day's quota
    # per account, so that replica is read off the undefended curve at that count.
    best = und.fidelity_at(top) or und.fidelity
    p = d.watermark_pvalue
    if d.first_suspension is not None:
        held, how = d.fidelity, f"suspended with {d.admitted} answers"
    elif per_day is not None:
        n = per_day * d.accounts
        at_n = und.fidelity_at(n) if n < top else best
        held = und.fidelity if at_n is None else at_n
        how = f"throttled: {n} answers per day of quota"
    else:
        held, how = best, "not stopped"
    gap = best - held
    if gap >= 0.20:
        replica = f"met ({how}: {held:.3f}, {gap * 100:.0f} pt below)"
    elif p is not None and p < 1e-6:
        replica = f"met by watermark p={p:.1e} ({how}: {held:.3f})"
    else:
        wm = (
            "no watermark p-value: no hook or no watermarked answers"
            if p is None
            else f"watermark p={p:.1e}"
        )
        replica = (f"missed by {(0.20 - gap) * 100:.0f} pt ({how}: {held:.3f}, "
                   f"{gap * 100:.0f} pt below; {wm})")  # fmt: skip
    return det, stop, replica


def _command() -> str:
    return " ".join(["python bench/bench_theft.py", *sys.argv[1:]]).strip()


def render(und: Profile, dfd: Profile, args: argparse.Namespace, elapsed: float,
           profile_text: str) -> str:  # fmt: skip
    top = max(args.budgets)
    stamp = getattr(args, "stamp", None) or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Theft resistance (bench/bench_theft.py)",
        "",
        f"Command: `{getattr(args, 'command', None) or _command()}`  ",
        f"Run: {stamp} on {platform.machine()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}, {elapsed / 60:.1f} min. Budgets {args.budgets}; "
        f"defended runs capped at {args.time_limit:g} s wall clock each; rotation uses "
        f"{args.rotation_accounts} accounts x 2 connections; attackers send "
        f"{args.batch} rows per request (the defended tiers count rows).",
        "",
        "Fidelity: top-1 agreement of the attacker's replica with the unperturbed model "
        "on the 540 held-out digits (soft-label replicas). Defended fidelity is the replica "
        "the attacker held after that budget or when it was stopped (answers in brackets). "
        "Refusals: requests sent before the first throttle (quota or rate limit) / "
        "challenge / suspension the attacker saw (`-`: never). Flagged: the first "
        "challenge or suspension (a quota refusal is not a flag; every account of the "
        "tier gets those), per account for rotation, or a non-normal server-side status "
        "(Admin GetAccount) at the end. Rate: answers per second of querying, "
        "undefended -> defended.",
        "",
        "| attack | budget | fidelity undefended | fidelity defended | refusals: throttle / "
        "challenge / suspend at | rate/s | watermark p | flagged < 1k | suspended or "
        "throttled <= 10% < 5k | replica >= 20 pt worse or watermarked |",
        "|---|---:|---:|---:|---|---|---:|---|---|---|",
    ]
    for name in args.attacks:
        u, d = und.runs[name], dfd.runs[name]
        det, stop, rep = targets(u, d, top, day_quota(profile_text))
        for b in args.budgets:
            fu, fd = _at(u, b), _at(d, b)
            held = min(b, d.admitted)
            wm = "n/a" if d.watermark_pvalue is None else f"{d.watermark_pvalue:.1e}"
            first = " / ".join(_q(v).replace("never", "-") for v in
                               (d.first_throttle, d.first_challenge, d.first_suspension))  # fmt: skip
            out.append(
                f"| {name} | {b} | {fu:.3f} | {fd:.3f} ({held}) | {first} | "
                f"{u.admitted_rate:.0f} -> {d.admitted_rate:.1f} | {wm} | "
                f"{det if b == top else ''} | "
                f"{stop if b == top else ''} | {rep if b == top else ''} |"
            )
    h_u, h_d = und.honest, dfd.honest
    honest_ok = h_d.agreement >= 0.995 and h_d.refused_accounts == 0
    out += [
        "",
        "## Honest users",
        "",
        "| deployment | accounts | answered | top-1 agreement | mean abs prob error | "
        "accounts refused |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in (und, dfd):
        h = p.honest
        out.append(f"| {p.name} | {h.accounts} | {h.answered}/{h.queries} | {h.agreement:.4f} | "
                   f"{h.prob_error:.5f} | {h.refused_accounts} |")  # fmt: skip
    out += [
        "",
        f"Target (>= 99.5% agreement and no honest account flagged): "
        f"**{'met' if honest_ok else 'missed'}** "
        f"(undefended agreement {h_u.agreement:.4f}).",
        "",
        "## Reading the targets",
        "",
        "- *Flagged < 1k* needs a detector that acts (challenge or suspension, or a "
        "non-normal status an operator can see); the defended profile's `[defense]` runs "
        "the detectors and graduated responses. A quota refusal is not a flag: every "
        "account of the tier gets those, honest or not.",
        "- *Watermark p*: the owner's check unseals the defended server's ledger and tests "
        "the replica; `n/a` when the attacker was stopped before any of its answers "
        "carried the watermark (nothing to prove, nothing stolen).",
        "- *Suspended or throttled*: a `[limits]` tier alone throttles every account far "
        "below 10% of the undefended rate; the verdict says whether it was the quota only.",
        "- *Replica*: throttling delays an attacker but does not stop one that keeps its "
        "accounts. The replica judged is the one held at suspension, otherwise the one a "
        "day of quota buys (per_day x accounts answers, read off the undefended curve). "
        "The 'fidelity defended' column is what the attacker held when the bench's wall "
        "clock stopped it, which flatters quotas.",
        "- Jacobian augmentation starts from 50 natural digits the attacker holds; on this "
        "small task a replica distilled from those and their answers already agrees with "
        "the victim on ~89% of held-out digits, so volume limits cannot push it 20 points "
        "down; only answers that carry a watermark (or perturbation) can.",
        "",
        "## Defended profile",
        "",
        "```toml",
        profile_text.strip(),
        "```",
        "",
        "![fidelity against queries, undefended vs defended](theft/pairs.png)",
        "",
    ]
    return "\n".join(out)


def _pairs_plot(und: Profile, dfd: Profile, args: argparse.Namespace, figs: Path) -> None:
    pairs = [(und.runs[a], dfd.runs[a]) for a in args.attacks]
    plot_pairs(pairs, figs / "pairs.png", title="Replica fidelity: undefended vs defended")


def _load_watermark(spec: str | None) -> Callable[[Path], WatermarkCheck | None] | None:
    if not spec:
        return None
    module, _, func = spec.partition(":")
    loaded: Callable[[Path], WatermarkCheck | None] = getattr(importlib.import_module(module), func)
    return loaded


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="budgets 200,500,1000; 20 honest users")
    p.add_argument("--budgets", default="1000,5000,20000")
    p.add_argument("--attacks", default="all")
    p.add_argument("--time-limit", type=float, default=40.0,
                   help="wall-clock cap per defended attack run (s)")  # fmt: skip
    p.add_argument("--max-wait", type=float, default=90.0,
                   help="attackers wait out per-minute windows, not daily ones")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=10, help="input rows per attack request")
    p.add_argument("--rotation-accounts", type=int, default=10)
    p.add_argument("--honest", type=int, default=100)
    p.add_argument("--honest-queries", type=int, default=10)
    p.add_argument("--profile", type=Path, default=HERE / "theft_defended.toml")
    p.add_argument("--watermark", help="MODULE:FUNC returning the owner's watermark check")
    p.add_argument("--out", type=Path, default=HERE / "THEFT.md")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite THEFT.md from bench/theft/*.json without running")  # fmt: skip
    args = p.parse_args()
    # A terminated bench still stops its servers (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.budgets, args.honest, args.honest_queries = "200,500,1000", 20, 5
        args.time_limit = min(args.time_limit, 15.0)
    args.budgets = sorted(int(b) for b in str(args.budgets).split(","))
    names = list(all_attacks())
    args.attacks = names if args.attacks == "all" else args.attacks.split(",")
    evaluation = Evaluation.demo()
    profile_text = args.profile.read_text()
    make_watermark = _load_watermark(args.watermark)
    t0 = time.monotonic()
    figs = HERE / "theft"
    if args.render_only:
        saved = [_load(figs / f"{n}.json", n) for n in ("undefended", "defended")]
        meta = json.loads((figs / "defended.json").read_text())
        args.command, args.stamp = meta.get("command"), meta.get("stamp")
        for key, value in meta.get("args", {}).items():
            setattr(args, key, value)
        _pairs_plot(saved[0], saved[1], args, figs)
        args.out.write_text(render(saved[0], saved[1], args, saved[0].elapsed, profile_text))
        print(f"rewrote {args.out}")
        return 0
    results = []
    for name, extra, cap in (
        ("undefended", "", 3600.0),
        ("defended", profile_text, args.time_limit),
    ):
        dep = Deployment(name, extra)
        try:
            wm = make_watermark(dep.config) if make_watermark else None
            results.append(run_profile(dep, args, evaluation, wm, cap))
        finally:
            dep.stop()
    und, dfd = results
    figs.mkdir(exist_ok=True)
    for prof in results:
        plot(list(prof.runs.values()), figs / f"{prof.name}.png", title=f"Extraction, {prof.name}")
        (figs / f"{prof.name}.json").write_text(json.dumps({
            "runs": {k: json.loads(m.to_json()) for k, m in prof.runs.items()},
            "honest": json.loads(prof.honest.to_json()),
            "args": {"budgets": args.budgets, "attacks": args.attacks,
                     "time_limit": args.time_limit, "batch": args.batch,
                     "rotation_accounts": args.rotation_accounts},
            "elapsed": time.monotonic() - t0,
            "command": _command(),
            "stamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }, indent=1))  # fmt: skip
    _pairs_plot(und, dfd, args, figs)
    args.out.write_text(render(und, dfd, args, time.monotonic() - t0, profile_text))
    print(f"wrote {args.out} in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
