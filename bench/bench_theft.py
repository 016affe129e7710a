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
digits at 1 request/s, before the attacks (the steady state) and after them.
Writes bench/THEFT.md (and bench/theft/*.png, *.json).

The attackers who blend in (bench/theft/blend_in.py, issue 16; ``--blend-in``) each
run on a fresh deployment of the same profile, after 20 honest users sent their
digits: the natural-data label thief (1 and 10 accounts, ``--blend-budget`` rows, paced
under ``--paced-tier``), and the sybil noise stream (50 accounts x 19 uniform rows),
after which 100 honest newcomers arrive (what the cohort view costs them).

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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.theft import blend_in  # noqa: E402
from sealserve import demo  # noqa: E402
from sealserve.auth import TokenIssuer, generate_keypair  # noqa: E402
from sealserve.enclave.simulated import SimulatedPlatform  # noqa: E402
from sealserve.redteam.attacks import all_attacks, with_marks  # noqa: E402
from sealserve.redteam.metrics import (  # noqa: E402
    Evaluation,
    HonestUtility,
    RunMetrics,
    WatermarkCheck,
    account_status,
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
            'model_repository = "models"\nport = 0\nworkers = 1\nunsafe_plaintext = true\n'
            'log_format = "text"\n' + plat + 'state_store = "sqlite://state.db"\n'
            f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
            f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n\n' + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.target = ""

    def token(self, account: str, scopes: tuple[str, ...] = ("infer",), tier: str = TIER) -> str:
        return self.issuer.issue(account, tier=tier, scopes=list(scopes), tos_version=TOS,
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
    #: honest users before any attack (the steady state); ``honest`` is after them
    honest_before: HonestUtility | None = None
    blend: dict[str, blend_in.Stream] = field(default_factory=dict)
    #: honest newcomers right after the sybil stream (the cohort view's cost)
    honest_after_sybils: HonestUtility | None = None
    #: honest users on the same profile with its band marks removed (their cost)
    honest_no_band: HonestUtility | None = None


def _load(path: Path, name: str) -> Profile:
    d = json.loads(path.read_text())
    runs = {k: RunMetrics.from_dict(v) for k, v in d["runs"].items()}

    def honest(key: str) -> HonestUtility | None:
        return HonestUtility(**d[key]) if d.get(key) else None

    return Profile(
        name, runs, HonestUtility(**d["honest"]), float(d.get("elapsed", 0.0)),
        honest("honest_before"),
        {k: blend_in.Stream.from_dict(v) for k, v in d.get("blend", {}).items()},
        honest("honest_after_sybils"),
        honest("honest_no_band"),
    )  # fmt: skip


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
    before = _honest(dep, target, args, evaluation, "before")
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
    if not args.attacks:  # nothing ran between: one steady-state batch
        dep.stop()
        return Profile(dep.name, runs, before)
    honest = _honest(dep, target, args, evaluation, "after")
    dep.stop()
    return Profile(dep.name, runs, honest, honest_before=before)


def _honest(dep: Deployment, target: str, args: argparse.Namespace, evaluation: Evaluation,
            tag: str, n: int | None = None) -> HonestUtility:  # fmt: skip
    """``n`` (default --honest) fresh honest accounts, --honest-queries held-out digits
    each at 1 request/s, paying challenges as the SDK does (the cost is measured)."""
    users = [dep.token(f"honest-{tag}-{i:03d}") for i in range(args.honest if n is None else n)]
    honest = honest_utility(target, users, evaluation, per_account=args.honest_queries,
                            rate=1.0, client_kwargs=PLAIN, pay_challenges=True)  # fmt: skip
    print(f"[{dep.name}] honest ({tag}): agreement {honest.agreement:.4f}, challenged "
          f"{honest.challenged_accounts} (paid {honest.paid_accounts}, cost "
          f"{honest.cost_ratio}x), refused accounts {honest.refused_accounts}/"
          f"{honest.accounts}", flush=True)  # fmt: skip
    return honest


BLEND_ATTACKS = ("label-thief", "label-thief-x10", "label-thief-aug", "sybil-noise")


def run_blend(
    name: str, extra: str, args: argparse.Namespace, evaluation: Evaluation,
    make_watermark: Callable[[Path], WatermarkCheck | None] | None, profile: Profile,
) -> None:  # fmt: skip
    """Each attacker who blends in on a fresh deployment of ``extra`` (after 20 honest
    users), measured into ``profile.blend``; 100 honest newcomers follow the sybils."""
    import tomllib

    tiers = tomllib.loads(extra).get("limits", {}).get("tiers", {}) if extra else {}
    paced = tiers.get(args.paced_tier)
    if extra and paced is None:
        raise SystemExit(f"--paced-tier {args.paced_tier!r} is not a tier of the profile")
    pace = blend_in.Pace.under(paced) if paced else None
    for attack in args.blend_in:
        dep = Deployment(f"{name}-{attack}", extra)
        try:
            wm = make_watermark(dep.config) if make_watermark else None
            target = dep.start()
            _honest(dep, target, args, evaluation, "background", n=20)
            t0 = time.monotonic()
            if attack == "sybil-noise":
                tokens = [(f"sybil-{i:02d}", dep.token(f"sybil-{i:02d}")) for i in range(50)]
                stream, x, y = blend_in.sybil_noise(target, tokens, client_kwargs=PLAIN,
                                                    time_limit=args.blend_time_limit)  # fmt: skip
            else:
                k = 10 if attack.endswith("x10") else 1
                # -aug: the band bench's thief (public digits shifted <= 1 px, N(0, 1) noise)
                aug = {"shift": 1, "noise": 1.0} if attack.endswith("-aug") else {}
                tier = args.paced_tier if extra else TIER
                tokens = [(f"{attack}-{i}", dep.token(f"{attack}-{i}", tier=tier))
                          for i in range(k)]  # fmt: skip
                stream, x, y = blend_in.label_thief(
                    target, tokens, budget=args.blend_budget, pace=pace, exclude=evaluation.x,
                    client_kwargs=PLAIN, time_limit=args.blend_time_limit, **aug,
                )  # fmt: skip
            # The replica at each checkpoint (a prefix of what it got), then the last.
            for b in sorted({*(c for c in (200, 500) if c < len(x)), len(x)}):
                if b:
                    predict = blend_in.replica(x[:b], y[:b])
                    fid = float(np.mean(predict(evaluation.x).argmax(axis=1) == evaluation.truth))
                    stream.curve.append((b, round(fid, 4)))
            stream.fidelity = stream.curve[-1][1] if stream.curve else 0.0
            if wm is not None and len(x):
                time.sleep(3.0)  # the sealed ledger is saved off the request path (2 s)
                stream.watermark_pvalue = wm(blend_in.replica(x, y))
            admin = dep.token("bench-operator", scopes=("admin",))
            stream.server_status = account_status(
                target, [n for n, _ in tokens], admin_token=admin,
                tier=TIER if attack == "sybil-noise" or not extra else args.paced_tier,
                client_kwargs=PLAIN,
            )  # fmt: skip
            profile.blend[attack] = stream
            print(f"[{dep.name}] {stream.answered}/{stream.sent} answered in "
                  f"{stream.elapsed_s:.0f} s, flagged at {stream.first_flag()} "
                  f"({stream.flagged_accounts()}/{stream.accounts} accounts), fidelity "
                  f"{stream.fidelity:.3f}, watermark p {stream.watermark_pvalue} "
                  f"[{time.monotonic() - t0:.0f} s]", flush=True)  # fmt: skip
            if attack == "sybil-noise":
                profile.honest_after_sybils = _honest(dep, target, args, evaluation,
                                                      "after-sybils")  # fmt: skip
        finally:
            dep.stop()


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
    carried = getattr(args, "carried", None)
    if carried:
        out[-2:-2] = [
            f"**This table was not re-run**: it is carried over from the run of "
            f"{carried.get('stamp')} (`{carried.get('command')}`), "
            + carried.get(
                "profile", "on the profile of that day (without `cohort_detection` and band marks)"
            )
            + "; this run measured the attackers who blend in and the honest users below, "
            "on the profile at the end.",
            "",
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
    out += blend_section(und, dfd, args, profile_text)
    h_u = und.honest
    out += [
        "",
        "## Honest users",
        "",
        "Each honest account is new and sends held-out digits at 1 request/s (reading "
        "probabilities) through the SDK, which pays a proof-of-work challenge and retries "
        "(as a real client does). *Before*: before any attack (the steady state); *after*: "
        "after the attacks of the first table; *after the sybils*: the honest newcomers who "
        "arrive right after the sybil noise stream (its own deployment). Challenged: "
        "accounts that were challenged at least once (paid: those that paid). Cost: the "
        "challenged accounts' mean wall time per request (challenge, solving, retry) over "
        "the median unchallenged request of the same row (ms in brackets), then the hashes "
        "they paid in all. Refused: accounts with a request they could not get answered "
        "(a paid challenge is not a refusal).",
        "",
        "| deployment | when | accounts | answered | top-1 agreement | mean abs prob error | "
        "challenged (paid) | cost of the challenged | accounts refused |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    verdicts = []
    for p in (und, dfd):
        main = "no attack on this deployment" if carried else "after the attacks"
        for when, h in (("before the attacks", p.honest_before), (main, p.honest),
                        ("after the sybils", p.honest_after_sybils),
                        ("band marks removed from the profile", p.honest_no_band)):  # fmt: skip
            if h is None:
                continue
            cost = ("-" if h.cost_ratio is None else
                    f"{h.cost_ratio:.2f}x ({h.base_ms:.1f} ms), {h.pow_hashes:,} hashes")  # fmt: skip
            challenged = f"{h.challenged_accounts} ({h.paid_accounts})" if h.paid else "-"
            out.append(f"| {p.name} | {when} | {h.accounts} | {h.answered}/{h.queries} | "
                       f"{h.agreement:.4f} | {h.prob_error:.5f} | {challenged} | {cost} | "
                       f"{h.refused_accounts} |")  # fmt: skip
            if p is dfd:
                ok = h.agreement >= 0.995 and h.refused_accounts == 0
                paid = (f", {h.challenged_accounts} challenged and paid"
                        if h.challenged_accounts else "")  # fmt: skip
                verdicts.append(f"{when}: **{'met' if ok else 'missed'}** "
                                f"({h.agreement:.4f}, {h.refused_accounts} refused{paid})")  # fmt: skip
    out += [
        "",
        "Target (>= 99.5% agreement and no honest account refused; challenged-and-paid "
        "is reported above, not hidden), defended: "
        + "; ".join(verdicts)
        + f" (undefended agreement {h_u.agreement:.4f}).",
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
    ]
    if dfd.blend:
        out += [
            "- *Attackers who blend in*: per-account detectors cannot tell the natural "
            "label thief from an honest user (its queries are what honest users send). "
            "Band marks exist only where the model's own margin is below 0.3; the public "
            "digits outside the held-out set are the model's training data, where its "
            "margin is almost never that small, so the thief's answers carry almost no "
            "band marks and the watermark has nothing to prove (docs/perturbation-"
            "watermark.md, *Honest limits*). A thief that augments its digits (shifts, "
            "pixel noise) leaves the honest distribution and the distribution detector "
            "suspends it within a few dozen rows.",
            "- *Cohort detection* flags the sybil stream from the pooled rows of young "
            "accounts; while the cohort is flagged, a young account is challenged until "
            "its own first 5 rows are natural (`cohort_challenge_difficulty`, 9 bits, "
            "~1.7x), noise-like ones at the full difficulty, and the episode ends when "
            "the pooled stream looks natural again (docs/defenses.md, *The aggregate "
            "view*). The *after the sybils* row is what an episode costs honest "
            "newcomers: those that arrive while the cohort is flagged pay the cheap "
            "challenge (its challenged, paid and cost columns) until their own rows "
            "graduate them; an account refused there could not get past it.",
        ]
    out += [
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


BAND = re.compile(r",\s*band\s*=\s*\{[^}]*\}")


def honest_without_band(args: argparse.Namespace, evaluation: Evaluation,
                        profile_text: str) -> HonestUtility | None:  # fmt: skip
    """--honest fresh honest accounts on the profile with its band marks removed (None
    when it has none): what the band marks cost honest users, next to the same run."""
    extra = BAND.sub("", profile_text)
    if extra == profile_text:
        return None
    dep = Deployment("defended-no-band", extra)
    try:
        return _honest(dep, dep.start(), args, evaluation, "no-band")
    finally:
        dep.stop()


def blend_section(und: Profile, dfd: Profile, args: argparse.Namespace,
                  profile_text: str) -> list[str]:  # fmt: skip
    """The table of the attackers who blend in (issue 16)."""
    if not dfd.blend:
        return []
    import tomllib

    tiers = tomllib.loads(profile_text).get("limits", {}).get("tiers", {})
    pace = blend_in.Pace.under(tiers[args.paced_tier]) if args.paced_tier in tiers else None
    real = blend_in.Pace.under(tiers[TIER]) if TIER in tiers else None
    carried = getattr(args, "blend_carried", None)
    out = [
        "",
        "## Attackers who blend in (issue 16)",
        "",
        *(
            [
                (
                    f"**Rows {', '.join(carried['rows'])} were not re-run**: they are "
                    if carried.get("rows")
                    else "**This table was not re-run**: it is "
                )
                + f"carried over from the run of {carried.get('stamp')} "
                f"(`{carried.get('command')}`).",
                "",
            ]
            if carried
            else []
        ),
        "Independent attack code (`bench/theft/blend_in.py`: the public SDK, scikit-learn "
        "digits, an MLP replica), each attacker on a fresh deployment after 20 honest "
        "users. *label-thief*: natural digits (the public scikit-learn digits outside the "
        "held-out set, as they are: what honest users send), `label` output only, "
        f"{args.blend_budget} rows in requests of 10, paced by a client-side token bucket "
        f"at 90% of tier `{args.paced_tier}`"
        + (f" ({pace.rate:.1f} rows/s per account" if pace else "")
        + (
            f"; the real `{TIER}` tier allows {real.rate / 0.9:.1f} rows/s, so this is the "
            f"real pace compressed {pace.rate / real.rate:.0f}x: see the profile's comment "
            "on why no detector can tell)"
            if pace and real and args.paced_tier != TIER
            else ")"
            if pace
            else ""
        )
        + "; *-x10*: the same rows over 10 accounts at once, each paced; *-aug*: the "
        "band-marks bench's thief (each digit shifted <= 1 px with N(0, 1) pixel noise). "
        "*sybil-noise*: "
        "50 fresh accounts x 19 uniform-noise rows, one row per request, 5 accounts at a "
        "time, reading probabilities. An account stops when challenged or suspended.",
        "",
        "Flagged at: rows the whole stream had sent when one of its accounts first saw a "
        "challenge or suspension (accounts that saw one / server-side non-normal at the "
        "end). Watermark p: the owner's check (`bench.theft_watermark:check`, the full "
        "`verify`: DAWN marks, signal, band marks pooled by top-1 fit; Bonferroni over the "
        "tests) on the replica trained on every answer the attacker got.",
        "",
        "| attack | accounts | answered / sent | fidelity undefended | fidelity defended | "
        "flagged at (accounts / server-side) | watermark p | flagged < 1k or watermarked "
        "(p < 1e-6) |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for name in args.blend_in:
        d = dfd.blend.get(name)
        if d is None:
            continue
        u = und.blend.get(name)
        flag = d.first_flag()
        server = sum(isinstance(st, dict) and st.get("kind", "normal") not in ("normal", "ok")
                     for st in d.server_status.values())  # fmt: skip
        p = d.watermark_pvalue
        if flag is not None and flag < 1000:
            verdict = f"met (flagged at {flag})"
        elif p is not None and p < 1e-6:
            verdict = f"met (watermark p={p:.1e})"
        else:
            verdict = (
                "missed ("
                + ("never flagged" if flag is None else f"flagged at {flag}")
                + ("; no watermark p-value)" if p is None else f"; watermark p={p:.1e})")
            )
        fu = f"{u.fidelity:.3f}" if u is not None else "-"
        out.append(
            f"| {name} | {d.accounts} | {d.answered} / {d.sent} | {fu} | "
            f"{d.fidelity:.3f} | {_q(flag)} ({d.flagged_accounts()} / {server}) | "
            f"{'n/a' if p is None else f'{p:.1e}'} | {verdict} |"
        )
    return out


def _pairs_plot(und: Profile, dfd: Profile, args: argparse.Namespace, figs: Path) -> None:
    pairs = [(und.runs[a], dfd.runs[a]) for a in args.attacks]
    if not pairs:
        return
    plot_pairs(pairs, figs / "pairs.png", title="Replica fidelity: undefended vs defended")


def _json(h: HonestUtility | None) -> Any:
    return None if h is None else json.loads(h.to_json())


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
    p.add_argument(
        "--blend-in",
        default="all",
        help=f"attackers who blend in: all, none, or some of {','.join(BLEND_ATTACKS)}",
    )
    p.add_argument(
        "--blend-budget",
        type=int,
        default=1000,
        help="rows the natural-data label thief sends (all its accounts together)",
    )
    p.add_argument(
        "--paced-tier",
        default="free_x20",
        help="the profile's tier the label thief holds and paces under (free: "
        "the real pace, ~19 min per 1,000 rows for one account)",
    )
    p.add_argument(
        "--blend-time-limit",
        type=float,
        default=1500.0,
        help="wall-clock cap per attacker who blends in (s)",
    )
    p.add_argument("--profile", type=Path, default=HERE / "theft_defended.toml")
    p.add_argument("--watermark", help="MODULE:FUNC returning the owner's watermark check")
    p.add_argument("--out", type=Path, default=HERE / "THEFT.md")
    p.add_argument(
        "--add-honest-without-band",
        action="store_true",
        help="run only the honest users on the profile without its band marks, "
        "add them to bench/theft/defended.json and rewrite THEFT.md",
    )
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
    args.attacks = (names if args.attacks == "all"
                    else [] if args.attacks == "none" else args.attacks.split(","))  # fmt: skip
    args.blend_in = (list(BLEND_ATTACKS) if args.blend_in == "all"
                     else [] if args.blend_in == "none" else args.blend_in.split(","))  # fmt: skip
    unknown = sorted(set(args.blend_in) - set(BLEND_ATTACKS))
    if unknown:
        p.error(f"--blend-in: unknown attacker(s) {', '.join(unknown)}")
    evaluation = Evaluation.demo()
    profile_text = args.profile.read_text()
    make_watermark = _load_watermark(args.watermark)
    t0 = time.monotonic()
    figs = HERE / "theft"
    if args.render_only or args.add_honest_without_band:
        saved = [_load(figs / f"{n}.json", n) for n in ("undefended", "defended")]
        meta = json.loads((figs / "defended.json").read_text())
        args.command, args.stamp = meta.get("command"), meta.get("stamp")
        for key, value in meta.get("args", {}).items():
            setattr(args, key, value)
        args.carried = meta.get("carried")
        args.blend_carried = meta.get("blend_carried")
        if args.add_honest_without_band:
            saved[1].honest_no_band = honest_without_band(args, evaluation, profile_text)
            meta["honest_no_band"] = _json(saved[1].honest_no_band)
            meta["command"] = args.command = f"{meta.get('command')} && {_command()}"
            (figs / "defended.json").write_text(json.dumps(meta, indent=1))
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
        run_blend(name, extra, args, evaluation, make_watermark, results[-1])
        if extra:
            results[-1].honest_no_band = honest_without_band(args, evaluation, extra)
    und, dfd = results
    figs.mkdir(exist_ok=True)
    if not args.attacks and (figs / "defended.json").exists():
        # Only the attackers who blend in ran: keep the last full run's attack table,
        # said so in THEFT.md (its stamp and profile are not this run's).
        carried = [_load(figs / f"{n}.json", n) for n in ("undefended", "defended")]
        meta = json.loads((figs / "defended.json").read_text())
        und.runs, dfd.runs = carried[0].runs, carried[1].runs
        args.attacks = list(meta.get("args", {}).get("attacks", list(dfd.runs)))
        args.budgets = list(meta.get("args", {}).get("budgets", args.budgets))
        args.carried = meta.get("carried") or {"stamp": meta.get("stamp"),
                                                "command": meta.get("command")}  # fmt: skip
    if not args.blend_in and (figs / "defended.json").exists():
        # Only the first table ran: keep the last run's attackers who blend in (and the
        # honest newcomers after the sybils), said so in THEFT.md.
        kept = [_load(figs / f"{n}.json", n) for n in ("undefended", "defended")]
        meta = json.loads((figs / "defended.json").read_text())
        for prof, old in zip(results, kept, strict=True):
            prof.blend, prof.honest_after_sybils = old.blend, old.honest_after_sybils
        saved_args = meta.get("args", {})
        args.blend_in = list(saved_args.get("blend_in", list(dfd.blend)))
        args.blend_budget = saved_args.get("blend_budget", args.blend_budget)
        args.paced_tier = saved_args.get("paced_tier", args.paced_tier)
        args.blend_carried = meta.get("blend_carried") or {"stamp": meta.get("stamp"),
                                                            "command": meta.get("command")}  # fmt: skip
    for prof in results:
        if prof.runs:
            plot(list(prof.runs.values()), figs / f"{prof.name}.png",
                 title=f"Extraction, {prof.name}")  # fmt: skip
        (figs / f"{prof.name}.json").write_text(json.dumps({
            "runs": {k: json.loads(m.to_json()) for k, m in prof.runs.items()},
            "honest": json.loads(prof.honest.to_json()),
            "honest_before": _json(prof.honest_before),
            "honest_after_sybils": _json(prof.honest_after_sybils),
            "honest_no_band": _json(prof.honest_no_band),
            "blend": {k: v.to_dict() for k, v in prof.blend.items()},
            "args": {"budgets": args.budgets, "attacks": args.attacks,
                     "time_limit": args.time_limit, "batch": args.batch,
                     "rotation_accounts": args.rotation_accounts, "blend_in": args.blend_in,
                     "blend_budget": args.blend_budget, "paced_tier": args.paced_tier},
            "carried": getattr(args, "carried", None),
            "blend_carried": getattr(args, "blend_carried", None),
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
