"""The attacker's view of a deployment: a query budget spent through the public SDK,
rotated over accounts and connections, with refusals handled as an attacker would.

Over 400 lines: local and remote oracles share one budget and refusal logic.

``RemoteOracle`` talks to an endpoint with ``sealserve.client.AsyncClient`` (one per
account and connection). Each request carries ``batch`` input rows (default 1); every
count (budget, sent, admitted, refused) is in rows, i.e. queries. On ``RateLimitedError`` it
waits ``retry_after`` when that is at most ``max_wait`` (meanwhile other accounts keep
going), otherwise it retires the account; on suspension or permission denial it drops
the account; a proof-of-work challenge is recorded, then paid; everything stops at the
budget, when no account is left, or at the wall-clock cap. Every request is counted.

``LocalOracle`` answers from a local model: the test double for attacks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from sealserve.client import AsyncClient
from sealserve.client.client import TokenSource
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SealserveError,
    SuspendedError,
    UnavailableError,
)

N_CLASSES = 10


@dataclass(frozen=True)
class Answers:
    """Answers to one batch of queries. Rows not admitted hold NaN and ``admitted``
    False; ``labels`` is -1 there."""

    probs: np.ndarray
    labels: np.ndarray
    admitted: np.ndarray

    def kept(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The admitted inputs and their probabilities."""
        return x[self.admitted], self.probs[self.admitted]


@dataclass(frozen=True)
class Event:
    """A refusal the attacker saw. ``kind``: throttle (rate limited), challenge,
    suspend (suspended or permission denied), retire (account given up), unavailable."""

    kind: str
    account: str
    sent: int  # requests sent in total when it happened
    admitted: int  # answers obtained in total when it happened
    account_sent: int  # requests this account had sent
    seconds: float
    message: str


@dataclass
class AccountLedger:
    name: str
    sent: int = 0
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    dropped: str = ""  # why the attacker stopped using it
    first: dict[str, int] = field(default_factory=dict)  # event kind -> rows sent by then


@dataclass
class Ledger:
    """Everything the oracle did."""

    accounts: dict[str, AccountLedger] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopped_because: str = ""
    elapsed: float = 0.0
    querying: float = 0.0  # seconds spent waiting for answers (not training)

    @property
    def sent(self) -> int:
        return sum(a.sent for a in self.accounts.values())

    @property
    def admitted(self) -> int:
        return sum(a.admitted for a in self.accounts.values())

    def first(self, *kinds: str) -> Event | None:
        """The first event of one of ``kinds``."""
        return next((e for e in self.events if e.kind in kinds), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "admitted": self.admitted,
            "stopped_because": self.stopped_because,
            "elapsed_s": round(self.elapsed, 3),
            "querying_s": round(self.querying, 3),
            "accounts": {
                n: {
                    "sent": a.sent,
                    "admitted": a.admitted,
                    "refused": dict(a.refused),
                    "dropped": a.dropped,
                    "first": dict(a.first),
                }
                for n, a in self.accounts.items()
            },
            # The first events tell the story; a throttled run can log thousands.
            "events": [asdict(e) for e in self.events[:200]],
            "events_total": len(self.events),
        }


class Oracle(Protocol):
    """A query budget. ``query`` answers at most ``remaining`` rows (the rest are
    marked not admitted); ``exhausted`` is True once nothing more will be answered."""

    ledger: Ledger

    @property
    def remaining(self) -> int: ...

    @property
    def exhausted(self) -> bool: ...

    def query(self, x: np.ndarray) -> Answers: ...


def _empty(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.full((n, N_CLASSES), np.nan),
        np.full(n, -1, np.int64),
        np.zeros(n, bool),
    )


class LocalOracle:
    """Answers from ``predict_proba`` with a budget: the test double."""

    def __init__(self, predict_proba: Callable[[np.ndarray], np.ndarray], *, budget: int) -> None:
        self._predict = predict_proba
        self.budget = budget
        self.ledger = Ledger(accounts={"local": AccountLedger("local")})

    @property
    def remaining(self) -> int:
        return self.budget - self.ledger.admitted

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0

    def query(self, x: np.ndarray) -> Answers:
        probs, labels, admitted = _empty(len(x))
        k = min(len(x), max(self.remaining, 0))
        if k:
            p = np.asarray(self._predict(x[:k].astype(np.float32)), np.float64)
            probs[:k], labels[:k], admitted[:k] = p, p.argmax(axis=1), True
            acct = self.ledger.accounts["local"]
            acct.sent += k
            acct.admitted += k
        self.ledger.elapsed = time.monotonic() - self.ledger.started
        return Answers(probs, labels, admitted)


@dataclass(frozen=True)
class Account:
    """One attacker account: a name (for the report) and its token."""

    name: str
    token: TokenSource

    @classmethod
    def from_token(cls, token: str, *, default: str) -> Account:
        """Name the account after the token's unverified ``sub`` claim (``default``
        when the token is not a readable JWT)."""
        import jwt

        try:
            sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
        except jwt.PyJWTError:
            sub = None
        return cls(str(sub) if sub else default, token)


@dataclass
class OracleConfig:
    """How the attacker spends its budget.

    ``concurrency``: requests in flight. ``batch``: input rows per request (1: one
    query per request; more is cheaper when the server counts requests, not rows).
    ``connections``: channels per account (the
    rotation spreads requests round-robin over accounts x connections). ``max_wait``:
    the longest ``retry_after`` worth waiting; longer and the account is retired.
    ``time_limit``: wall-clock cap for the whole run (seconds)."""

    model: str = "digits"
    input_name: str = "input"
    concurrency: int = 4
    batch: int = 1
    connections: int = 1
    max_wait: float = 5.0
    time_limit: float = 300.0
    unavailable_retries: int = 5
    timeout: float = 30.0


@dataclass
class _Slot:
    account: AccountLedger
    client: AsyncClient
    ready_at: float = 0.0

    @property
    def active(self) -> bool:
        return not self.account.dropped


class RemoteOracle:
    """A budget of queries against ``target`` through the public SDK.

    ``client_kwargs`` are passed to every ``AsyncClient`` (``unsafe_plaintext``,
    ``root_certificates``, ``policy``, ``roots``...). ``accounts`` may hold one
    ``Account(name, None)`` for a server without auth. Call ``close()`` when done.
    """

    def __init__(
        self,
        target: str,
        accounts: Sequence[Account],
        *,
        budget: int,
        config: OracleConfig | None = None,
        client_kwargs: dict[str, Any] | None = None,
        progress: Callable[[Ledger], None] | None = None,
    ) -> None:
        if not accounts or budget < 1:
            raise ValueError("need at least one account and a positive budget")
        self.config = config or OracleConfig()
        self.budget = budget
        self.ledger = Ledger()
        self._progress = progress
        self._loop = asyncio.new_event_loop()
        self._slots: list[_Slot] = []
        for acct in accounts:
            ledger = self.ledger.accounts.setdefault(acct.name, AccountLedger(acct.name))
            for _ in range(max(1, self.config.connections)):
                client = AsyncClient(
                    target,
                    token=acct.token,
                    timeout=self.config.timeout,
                    solve_challenges=False,  # see the challenge first, then pay it
                    **(client_kwargs or {}),
                )
                self._slots.append(_Slot(ledger, client))
        self._rr = itertools.count()
        self._deadline = self.ledger.started + self.config.time_limit
        self._stop = ""

    @property
    def remaining(self) -> int:
        return self.budget - self.ledger.admitted

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0 or bool(self._stop)

    def query(self, x: np.ndarray) -> Answers:
        probs, labels, admitted = _empty(len(x))
        n = min(len(x), max(self.remaining, 0))
        if n and not self._stop:
            t0 = time.monotonic()
            self._loop.run_until_complete(self._run(x[:n].astype(np.float32), probs, admitted))
            self.ledger.querying += time.monotonic() - t0
        labels[admitted] = np.nanargmax(probs[admitted], axis=1) if admitted.any() else []
        self.ledger.elapsed = time.monotonic() - self.ledger.started
        if self.remaining <= 0 and not self.ledger.stopped_because:
            self.ledger.stopped_because = "budget spent"
        return Answers(probs, labels, admitted)

    def __enter__(self) -> RemoteOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection and the oracle's event loop."""

        async def _close() -> None:
            for slot in self._slots:
                await slot.client.close()

        self._loop.run_until_complete(_close())
        self._loop.close()

    def _halt(self, why: str) -> None:
        if not self._stop:
            self._stop = why
            self.ledger.stopped_because = why

    def _event(self, kind: str, slot: _Slot, message: str) -> None:
        slot.account.first.setdefault(kind, slot.account.sent)
        self.ledger.events.append(
            Event(
                kind,
                slot.account.name,
                self.ledger.sent,
                self.ledger.admitted,
                slot.account.sent,
                round(time.monotonic() - self.ledger.started, 3),
                message[:200],
            )
        )

    async def _pick(self) -> _Slot | None:
        """The next usable slot in round-robin order, waiting for a throttled one if
        every active slot is waiting; None when none is left or time is up."""
        while not self._stop:
            active = [s for s in self._slots if s.active]
            if not active:
                self._halt("every account refused or retired")
                return None
            start = next(self._rr)
            now = time.monotonic()
            for k in range(len(active)):
                slot = active[(start + k) % len(active)]
                if slot.ready_at <= now:
                    return slot
            wake = min(s.ready_at for s in active)
            if wake >= self._deadline:
                self._halt("wall-clock cap reached while throttled")
                return None
            await asyncio.sleep(max(0.0, wake - now))
        return None

    async def _one(self, rows: np.ndarray) -> np.ndarray | None:
        failures = 0
        while not self._stop:
            if time.monotonic() >= self._deadline:
                self._halt("wall-clock cap reached")
                return None
            slot = await self._pick()
            if slot is None:
                return None
            slot.account.sent += len(rows)
            try:
                out = await slot.client.infer(self.config.model, {self.config.input_name: rows})
            except ChallengeRequiredError as exc:
                slot.account.refused["challenge"] += len(rows)
                self._event("challenge", slot, exc.message)
                if slot.client.solve_challenges:  # paid and still refused: give up on it
                    slot.account.dropped = "challenge not accepted"
                    self._event("retire", slot, "challenge not accepted")
                slot.client.solve_challenges = True
                continue
            except RateLimitedError as exc:
                slot.account.refused["throttle"] += len(rows)
                self._event("throttle", slot, exc.message)
                wait = exc.retry_after
                if wait is None or wait > self.config.max_wait:
                    self._retire(slot, f"retry-after {wait} s over max_wait")
                else:
                    # The limit is the account's: rest every connection of it.
                    until = time.monotonic() + wait
                    for s in self._slots:
                        if s.account is slot.account:
                            s.ready_at = max(s.ready_at, until)
                continue
            except (SuspendedError, PermissionDeniedError) as exc:
                slot.account.refused["suspend"] += len(rows)
                self._event("suspend", slot, exc.message)
                self._retire(slot, "suspended or denied")
                continue
            except UnavailableError as exc:
                slot.account.refused["unavailable"] += len(rows)
                self._event("unavailable", slot, exc.message)
                failures += 1
                if failures > self.config.unavailable_retries:
                    return None
                await asyncio.sleep(0.1 * 2**failures)
                continue
            except SealserveError as exc:  # any other answer: the account stops, recorded
                slot.account.refused["error"] += len(rows)
                self._event("error", slot, f"{type(exc).__name__}: {exc}"[:200])
                self._retire(slot, f"unexpected {type(exc).__name__}")
                continue
            slot.account.admitted += len(rows)
            return np.asarray(out["probabilities"], np.float64).reshape(len(rows), -1)
        return None

    def _retire(self, slot: _Slot, why: str) -> None:
        # Every connection of the account shares its ledger, so all of them go: the
        # refusal is about the account, not the connection.
        if not slot.account.dropped:
            slot.account.dropped = why
            self._event("retire", slot, why)

    async def _run(self, x: np.ndarray, probs: np.ndarray, admitted: np.ndarray) -> None:
        step = max(1, self.config.batch)
        chunks = iter(range(0, len(x), step))
        last_report = [time.monotonic()]

        async def worker() -> None:
            for i in chunks:
                if self._stop:
                    return
                p = await self._one(x[i : i + step])
                if p is not None:
                    probs[i : i + len(p), : p.shape[1]] = p
                    admitted[i : i + len(p)] = True
                if self._progress and time.monotonic() - last_report[0] > 2.0:
                    last_report[0] = time.monotonic()
                    self.ledger.elapsed = time.monotonic() - self.ledger.started
                    self._progress(self.ledger)

        workers = max(1, min(self.config.concurrency, -(-len(x) // step)))
        await asyncio.gather(*(worker() for _ in range(workers)))
