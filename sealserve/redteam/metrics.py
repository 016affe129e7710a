"""What a red-team run measured, and how to run one.

``run_attack`` spends one attack's budget through an oracle and returns ``RunMetrics``:
queries sent and admitted, replica fidelity (top-1 agreement with the unperturbed
model on held-out inputs) and accuracy, the fidelity curve, the refusals the attacker
saw (first throttle / challenge / suspension, overall and per account), the
server-side account statuses when an admin token is given, and the watermark p-value
when the owner passes a verifier. ``honest_utility`` measures what honest users on
the same deployment get.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from sealserve.client import AsyncClient
from sealserve.client.client import open_channel
from sealserve.errors import ChallengeRequiredError, RefusedError, SealserveError
from sealserve.redteam.attacks import Attack
from sealserve.redteam.oracle import Account, Ledger, Oracle, OracleConfig, RemoteOracle
from sealserve.redteam.replica import Replica

#: The owner's watermark check: given the replica's predict function, a p-value (or
#: None when there is nothing to verify against).
WatermarkCheck = Callable[[Callable[[np.ndarray], np.ndarray]], float | None]


@dataclass(frozen=True)
class Evaluation:
    """The owner's held-out set and the unperturbed model's answers on it."""

    x: np.ndarray
    y: np.ndarray
    truth_probs: np.ndarray

    @property
    def truth(self) -> np.ndarray:
        out: np.ndarray = self.truth_probs.argmax(axis=1)
        return out

    @classmethod
    def demo(cls) -> Evaluation:
        """The digits demo: ``sealserve.demo.holdout()`` and the bundled ONNX model."""
        from sealserve import demo
        from sealserve.redteam.replica import GroundTruth

        x, y = demo.holdout()
        return cls(x, y, GroundTruth.demo().predict_proba(x))

    def fidelity(self, replica: Replica) -> float:
        return float(np.mean(replica.predict(self.x) == self.truth))

    def accuracy(self, replica: Replica) -> float:
        return float(np.mean(replica.predict(self.x) == self.y))


@dataclass
class RunMetrics:
    """One attack run. Query counts are requests (one input row each)."""

    attack: str
    budget: int
    accounts: int
    sent: int = 0
    admitted: int = 0
    fidelity: float = 0.0
    accuracy: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (admitted, fidelity)
    first_throttle: int | None = None  # requests sent before the first refusal of a kind
    first_challenge: int | None = None
    first_suspension: int | None = None
    first_refusal_per_account: dict[str, int | None] = field(default_factory=dict)
    #: account -> {event kind -> rows that account had sent when it first happened}
    first_events_per_account: dict[str, dict[str, int]] = field(default_factory=dict)
    admitted_per_account: dict[str, int] = field(default_factory=dict)
    stopped_because: str = ""
    elapsed_s: float = 0.0
    admitted_rate: float = 0.0  # admitted queries per second spent querying
    server_status: dict[str, Any] = field(default_factory=dict)
    watermark_pvalue: float | None = None
    ledger: dict[str, Any] = field(default_factory=dict)

    @property
    def first_detection(self) -> int | None:
        """Requests sent before the first refusal of any kind the attacker saw."""
        seen = [v for v in (self.first_throttle, self.first_challenge, self.first_suspension)]
        known = [v for v in seen if v is not None]
        return min(known) if known else None

    def fidelity_at(self, queries: int) -> float | None:
        """The replica's fidelity at the last checkpoint with at most ``queries``."""
        points = [f for n, f in self.curve if n <= queries]
        return points[-1] if points else None

    def to_json(self) -> str:
        d = asdict(self)
        d["first_detection"] = self.first_detection
        return json.dumps(d, indent=2, default=float)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        """Read back what ``to_json`` wrote."""
        names = {f.name for f in fields(cls)}
        m = cls(**{k: v for k, v in d.items() if k in names})
        m.curve = [(int(n), float(f)) for n, f in m.curve]
        return m


def _fill_from_ledger(m: RunMetrics, ledger: Ledger) -> None:
    m.sent, m.admitted = ledger.sent, ledger.admitted
    for kind, attr in (("throttle", "first_throttle"), ("challenge", "first_challenge"),
                       ("suspend", "first_suspension")):  # fmt: skip
        ev = ledger.first(kind)
        setattr(m, attr, None if ev is None else ev.sent)
    for name, acct in ledger.accounts.items():
        m.admitted_per_account[name] = acct.admitted
        m.first_events_per_account[name] = dict(acct.first)
        refusals = [v for k, v in acct.first.items() if k in ("throttle", "challenge", "suspend")]
        m.first_refusal_per_account[name] = min(refusals) if refusals else None
    m.stopped_because = ledger.stopped_because or "attack finished"
    m.elapsed_s = ledger.elapsed
    # Answers per second of querying: training time between rounds does not count.
    busy = ledger.querying or ledger.elapsed
    m.admitted_rate = ledger.admitted / busy if busy > 0 else 0.0
    m.ledger = ledger.to_dict()


def run_attack_with(
    attack: Attack,
    oracle: Oracle,
    evaluation: Evaluation,
    *,
    budget: int,
    watermark_pvalue: WatermarkCheck | None = None,
    on_checkpoint: Callable[[int, float], None] | None = None,
) -> RunMetrics:
    """Run ``attack`` on ``oracle`` and measure the replica it ends with."""
    m = RunMetrics(attack.name, budget, len(oracle.ledger.accounts))

    def checkpoint(replica: Replica) -> None:
        point = (oracle.ledger.admitted, round(evaluation.fidelity(replica), 4))
        m.curve.append(point)
        if on_checkpoint is not None:
            on_checkpoint(*point)

    replica = attack.run(oracle, checkpoint)
    oracle.ledger.elapsed = max(oracle.ledger.elapsed, 1e-9)
    _fill_from_ledger(m, oracle.ledger)
    m.fidelity, m.accuracy = evaluation.fidelity(replica), evaluation.accuracy(replica)
    if watermark_pvalue is not None and m.admitted:
        m.watermark_pvalue = watermark_pvalue(replica.predict)
    return m


def plan_accounts(
    attacks: Sequence[Attack], accounts: Sequence[Account]
) -> tuple[list[list[Account]], list[str]]:
    """Which accounts each attack runs with, in order: an attack that uses ``n``
    accounts takes the next ``n`` not used by an earlier attack, so a later attack
    does not start on an account an earlier one got throttled or suspended; one that
    uses all (``accounts=None``, e.g. ``rotation``) gets every account. When the fresh
    ones run out, accounts are reused from the first again, and the second list says
    so (one line per attack that reuses)."""
    plans: list[list[Account]] = []
    warnings: list[str] = []
    cursor = 0
    for attack in attacks:
        if attack.accounts is None or not accounts:
            plans.append(list(accounts))
            continue
        want = min(attack.accounts, len(accounts))
        if cursor + want > len(accounts):
            warnings.append(
                f"{attack.name}: no fresh account left ({len(accounts)} given); reusing "
                "accounts earlier attacks may have got throttled (give one token per "
                "attack in --token-file)"
            )
            cursor = 0
        plans.append(list(accounts[cursor : cursor + want]))
        cursor += want
    return plans, warnings


def run_attack(
    attack: Attack,
    target: str,
    accounts: Sequence[Account],
    *,
    budget: int,
    evaluation: Evaluation,
    config: OracleConfig | None = None,
    client_kwargs: dict[str, Any] | None = None,
    watermark_pvalue: WatermarkCheck | None = None,
    admin_token: str | None = None,
    tier: str = "",
    progress: Callable[[str], None] | None = None,
) -> RunMetrics:
    """Run ``attack`` against ``target`` with (its share of) ``accounts``.

    With ``admin_token``, each account's server-side status (Admin.GetAccount) is
    read after the run into ``server_status``. Raises ValueError without accounts."""
    cfg = config or OracleConfig()
    use = list(accounts if attack.accounts is None else accounts[: attack.accounts])
    cfg = OracleConfig(**{**asdict(cfg), "connections": max(cfg.connections, attack.connections)})
    say = progress or (lambda _s: None)

    def ledger_progress(ledger: Ledger) -> None:
        say(f"  {attack.name}: {ledger.sent} sent, {ledger.admitted} admitted, "
            f"{len(ledger.events)} refusals, {ledger.elapsed:.0f} s")  # fmt: skip

    oracle = RemoteOracle(
        target, use, budget=budget, config=cfg, client_kwargs=client_kwargs,
        progress=ledger_progress,
    )  # fmt: skip
    try:
        m = run_attack_with(
            attack, oracle, evaluation, budget=budget, watermark_pvalue=watermark_pvalue,
            on_checkpoint=lambda n, f: say(f"  {attack.name}: {n} answers -> fidelity {f:.3f}"),
        )  # fmt: skip
    finally:
        oracle.close()
    if admin_token is not None:
        m.server_status = account_status(
            target, [a.name for a in use], admin_token=admin_token, tier=tier,
            client_kwargs=client_kwargs,
        )  # fmt: skip
    return m


def account_status(
    target: str,
    accounts: Sequence[str],
    *,
    admin_token: str,
    tier: str = "",
    client_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each account's status as the server's Admin service reports it (owner only).
    A failure is recorded per account as ``{"error": message}``, never raised."""
    import grpc

    from sealserve._proto import admin_pb2, admin_pb2_grpc
    from sealserve.client.errors import from_rpc_error

    kw = dict(client_kwargs or {})
    channel, _ = open_channel(target, **kw)
    stub: Any = admin_pb2_grpc.AdminStub(channel)
    out: dict[str, Any] = {}
    try:
        for name in accounts:
            try:
                info = stub.GetAccount(
                    admin_pb2.AccountRequest(account=name, tier=tier),
                    metadata=(("authorization", f"Bearer {admin_token}"),),
                    timeout=10,
                )
                out[name] = json.loads(info.status_json or "{}")
            except grpc.RpcError as exc:
                out[name] = {"error": from_rpc_error(exc).message}
    finally:
        channel.close()
    return out


@dataclass
class HonestUtility:
    """What honest users got: agreement of their top-1 with the unperturbed model,
    mean absolute probability error, and how many accounts saw a refusal they could
    not get past (``refused_accounts``). With ``pay_challenges`` a challenge is paid
    the way the SDK pays it and is not a refusal: ``challenged_accounts`` saw one,
    ``paid_accounts`` paid (``pow_hashes``, ``pow_seconds`` in all), and
    ``cost_ratio`` is the challenged accounts' mean wall time per request over the
    median time of an unchallenged request (``base_ms``); None when none was."""

    accounts: int
    queries: int
    answered: int
    agreement: float
    prob_error: float
    refused_accounts: int
    refusals: dict[str, int]
    challenged_accounts: int = 0
    paid_accounts: int = 0
    pow_hashes: int = 0
    pow_seconds: float = 0.0
    cost_ratio: float | None = None
    base_ms: float | None = None
    paid: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def honest_utility(
    target: str,
    tokens: Sequence[str | None],
    evaluation: Evaluation,
    *,
    per_account: int = 10,
    rate: float = 1.0,
    model: str = "digits",
    input_name: str = "input",
    client_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    pay_challenges: bool = False,
) -> HonestUtility:
    """Every token is an honest user sending ``per_account`` held-out inputs at
    ``rate`` requests per second (all users at once). Refusals are counted, not
    retried (an honest user who is refused has lost utility). ``pay_challenges``:
    the client pays proof of work as the SDK does by default (and the cost is
    measured); otherwise a challenge is a refusal (seen rather than paid silently)."""
    rng = np.random.default_rng(seed)
    refusals: dict[str, int] = {}
    refused_accounts = challenged_accounts = paid_accounts = pow_hashes = 0
    pow_seconds = 0.0
    got: list[tuple[int, np.ndarray]] = []
    plain_s: list[float] = []  # wall time of each request answered without a challenge
    per_user: list[list[float]] = []  # each challenged account's request wall times

    async def user(token: str | None) -> None:
        nonlocal refused_accounts, challenged_accounts, paid_accounts, pow_hashes, pow_seconds
        refused = challenged = False
        times: list[float] = []
        rows = rng.choice(len(evaluation.x), per_account, replace=False)
        client = AsyncClient(
            target, token=token, solve_challenges=pay_challenges, **(client_kwargs or {})
        )
        try:
            # Stagger starts so users do not arrive in lockstep.
            await asyncio.sleep(float(rng.uniform(0, 1.0 / rate)))
            for i in rows:
                t0 = time.monotonic()
                paid_before = client.pow_paid.challenges
                try:
                    out = await client.infer(model, {input_name: evaluation.x[i : i + 1]})
                    got.append((int(i), np.asarray(out["probabilities"], np.float64)[0]))
                    if client.pow_paid.challenges == paid_before:
                        plain_s.append(time.monotonic() - t0)
                except (RefusedError, ChallengeRequiredError) as exc:
                    refused = True
                    challenged |= isinstance(exc, ChallengeRequiredError)
                    key = type(exc).__name__
                    refusals[key] = refusals.get(key, 0) + 1
                except SealserveError as exc:
                    key = type(exc).__name__
                    refusals[key] = refusals.get(key, 0) + 1
                challenged |= client.pow_paid.challenges > paid_before
                times.append(time.monotonic() - t0)
                await asyncio.sleep(max(0.0, 1.0 / rate - (time.monotonic() - t0)))
        finally:
            await client.close()
        refused_accounts += refused
        challenged_accounts += challenged
        paid_accounts += client.pow_paid.challenges > 0
        pow_hashes += client.pow_paid.hashes
        pow_seconds += client.pow_paid.seconds
        if challenged:
            per_user.append(times)

    async def main() -> None:
        await asyncio.gather(*(user(t) for t in tokens))

    asyncio.run(main())
    if got:
        idx = np.array([i for i, _ in got])
        probs = np.stack([p for _, p in got])
        agreement = float(np.mean(probs.argmax(axis=1) == evaluation.truth[idx]))
        error = float(np.mean(np.abs(probs - evaluation.truth_probs[idx])))
    else:
        agreement, error = 0.0, float("nan")
    base = float(np.median(plain_s)) if plain_s else None
    ratio = (
        float(np.mean([np.mean(t) / base for t in per_user if t]))
        if base and any(per_user)
        else None
    )
    return HonestUtility(
        accounts=len(tokens),
        queries=len(tokens) * per_account,
        answered=len(got),
        agreement=agreement,
        prob_error=error,
        refused_accounts=refused_accounts,
        refusals=refusals,
        challenged_accounts=challenged_accounts,
        paid_accounts=paid_accounts,
        pow_hashes=pow_hashes,
        pow_seconds=round(pow_seconds, 4),
        cost_ratio=None if ratio is None else round(ratio, 3),
        base_ms=None if base is None else round(base * 1000, 3),
        paid=pay_challenges,
    )
