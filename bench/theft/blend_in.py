"""Attackers who blend in (issue 16), written as a thief would: the public SDK, the
public digits data set and scikit-learn, nothing from ``sealserve.redteam``.

- **Natural-data label thief** (Copycat / Knockoff style): queries with natural digits
  (the public scikit-learn digits the owner did not hold out, as they are: inputs like
  honest users'; optional pixel shifts and noise, which the distribution detector
  catches within 20 rows), asks for the ``label`` output
  only, and paces itself under its tier's limits with a client-side token bucket, with
  one account or rotating over several (each account paced on its own). Trains an MLP
  on the labels it got.
- **Sybil noise stream**: many fresh accounts, each sending a few uniform-noise rows
  (fewer than a per-account detector's ``min_queries``), one row per request, reading
  the default outputs; trains an MLP on the argmax of the answers.

An account that is challenged or suspended stops (a thief does not pay proof of work
per row; it moves on to its next account); a rate-limit refusal is waited out (bounded).
What each account saw, and when, is kept for the report.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sealserve.client import AsyncClient
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SealserveError,
    SuspendedError,
)

MODEL, INPUT = "digits", "input"
#: Longest single wait for a rate-limit refusal's retry-after (a daily quota is not
#: waited out: the account is retired).
MAX_WAIT_S = 30.0


@dataclass
class Stream:
    """What one attack run sent and got. Row counts are input rows."""

    attack: str
    accounts: int
    budget: int
    sent: int = 0
    answered: int = 0
    #: account -> {kind: rows the whole stream had sent when that account first saw it}
    first_seen: dict[str, dict[str, int]] = field(default_factory=dict)
    answered_per_account: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    stopped_because: str = "budget spent"
    #: (answers, fidelity) of the replica at each checkpoint (filled by the caller)
    curve: list[tuple[int, float]] = field(default_factory=list)
    fidelity: float = 0.0
    watermark_pvalue: float | None = None
    server_status: dict[str, Any] = field(default_factory=dict)

    def first_flag(self) -> int | None:
        """Rows the stream had sent when any of its accounts was first challenged or
        suspended (None: never)."""
        flags = [v for seen in self.first_seen.values() for k, v in seen.items()
                 if k in ("challenge", "suspend")]  # fmt: skip
        return min(flags) if flags else None

    def flagged_accounts(self) -> int:
        return sum(any(k in ("challenge", "suspend") for k in seen)
                   for seen in self.first_seen.values())  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stream:
        s = cls(**d)
        s.curve = [(int(n), float(f)) for n, f in s.curve]
        return s


@dataclass(frozen=True)
class Pace:
    """A client-side token bucket in rows: ``rate`` rows per second, ``burst`` rows."""

    rate: float
    burst: float

    @classmethod
    def under(cls, tier: dict[str, Any], *, margin: float = 0.9) -> Pace:
        """``margin`` of the tightest rate of a ``[limits.tiers.X]`` table (rate per
        second, per_minute / 60) and of its burst. The daily quota is a budget, not a
        pace: a thief whose budget fits in it need not spread it over the day."""
        limits = [float(tier[k]) / d for k, d in (("rate", 1), ("per_minute", 60)) if k in tier]
        rate = margin * min(limits) if limits else float("inf")
        burst = margin * float(tier.get("burst", tier.get("per_minute", 1)))
        return cls(rate=rate, burst=max(1.0, burst))


class _Bucket:
    def __init__(self, pace: Pace | None) -> None:
        self.pace = pace
        self.level = pace.burst if pace else 0.0
        self.at = time.monotonic()

    async def take(self, rows: int) -> None:
        if self.pace is None or not np.isfinite(self.pace.rate):
            return
        while True:
            now = time.monotonic()
            self.level = min(self.pace.burst, self.level + (now - self.at) * self.pace.rate)
            self.at = now
            if self.level >= rows:
                self.level -= rows
                return
            await asyncio.sleep((rows - self.level) / self.pace.rate)


def natural_digits(
    n: int, *, exclude: np.ndarray, seed: int, shift: int = 0, noise: float = 0.0
) -> np.ndarray:
    """``n`` natural queries: public scikit-learn digits that are not in ``exclude``
    (the owner's held-out set, on which replicas are judged), each used once before
    any is repeated, each shifted by up to ``shift`` pixels (and given N(0, ``noise``) pixel noise),
    clipped to 0..16."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    held = {row.tobytes() for row in np.asarray(exclude, np.float32)}
    pool = np.array([row for row in x if row.tobytes() not in held])
    rng = np.random.default_rng(seed)
    # Each public digit once (in a random order) before any repeats.
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])
    base = pool[order[:n]].reshape(n, 8, 8)
    shifts = rng.integers(-shift, shift + 1, (n, 2))
    out = np.stack(
        [np.roll(b, (int(s[0]), int(s[1])), axis=(0, 1)) for b, s in zip(base, shifts, strict=True)]
    )
    noisy = out.reshape(n, 64) + (rng.normal(0.0, noise, (n, 64)) if noise else 0.0)
    return np.clip(noisy, 0.0, 16.0).astype(np.float32)


def uniform_noise(n: int, *, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 16.0, (n, 64)).astype(np.float32)


class _Run:
    """Bookkeeping shared by an attack's account tasks (one event loop)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    def seen(self, account: str, kind: str) -> None:
        self.stream.first_seen.setdefault(account, {}).setdefault(kind, self.stream.sent)

    def got(self, account: str, x: np.ndarray, y: np.ndarray) -> None:
        self.x.append(x)
        self.y.append(y)
        self.stream.answered += len(x)
        per = self.stream.answered_per_account
        per[account] = per.get(account, 0) + len(x)


async def _account(
    run: _Run, client: AsyncClient, name: str, rows: np.ndarray, *, batch: int,
    pace: Pace | None, outputs: tuple[str, ...], read: Callable[[dict[str, Any]], np.ndarray],
    deadline: float,
) -> None:  # fmt: skip
    """One account sends its share of rows, ``batch`` per request, under ``pace``."""
    bucket = _Bucket(pace)
    i = 0
    while i < len(rows):
        if time.monotonic() > deadline:
            run.stream.stopped_because = "wall-clock cap"
            return
        chunk = rows[i : i + batch]
        await bucket.take(len(chunk))
        run.stream.sent += len(chunk)
        try:
            out = await client.infer(MODEL, {INPUT: chunk}, outputs=outputs)
        except ChallengeRequiredError:
            run.seen(name, "challenge")  # proof of work per row: this account is spent
            return
        except (SuspendedError, PermissionDeniedError):
            run.seen(name, "suspend")
            return
        except RateLimitedError as exc:
            run.seen(name, "throttle")
            run.stream.sent -= len(chunk)  # refused before inference: not answered
            wait = exc.retry_after if exc.retry_after is not None else 1.0
            if wait > MAX_WAIT_S:
                return  # a daily quota: retire the account
            await asyncio.sleep(wait)
            continue
        except SealserveError:
            run.seen(name, "error")
            return
        run.got(name, chunk, read(out))
        i += len(chunk)


async def _stream(
    attack: str, target: str, tokens: Sequence[tuple[str, str]], rows: np.ndarray, *,
    batch: int, pace: Pace | None, outputs: tuple[str, ...],
    read: Callable[[dict[str, Any]], np.ndarray], concurrent: int, time_limit: float,
    client_kwargs: dict[str, Any],
) -> tuple[Stream, np.ndarray, np.ndarray]:  # fmt: skip
    stream = Stream(attack, len(tokens), len(rows))
    run = _Run(stream)
    shares = np.array_split(np.arange(len(rows)), len(tokens))
    gate = asyncio.Semaphore(concurrent)
    t0 = time.monotonic()
    deadline = t0 + time_limit

    async def one(name: str, token: str, idx: np.ndarray) -> None:
        async with gate:
            client = AsyncClient(target, token=token, solve_challenges=False, **client_kwargs)
            try:
                await _account(run, client, name, rows[idx], batch=batch, pace=pace,
                               outputs=outputs, read=read, deadline=deadline)  # fmt: skip
            finally:
                await client.close()

    await asyncio.gather(*(one(n, t, idx) for (n, t), idx in zip(tokens, shares, strict=True)))
    stream.elapsed_s = time.monotonic() - t0
    x = np.concatenate(run.x) if run.x else np.empty((0, 64), np.float32)
    y = np.concatenate(run.y) if run.y else np.empty((0,), np.int64)
    return stream, x, y


def label_thief(
    target: str, tokens: Sequence[tuple[str, str]], *, budget: int, pace: Pace | None,
    exclude: np.ndarray, batch: int = 10, time_limit: float = 600.0,
    client_kwargs: dict[str, Any] | None = None, seed: int = 11, shift: int = 0,
    noise: float = 0.0,
) -> tuple[Stream, np.ndarray, np.ndarray]:  # fmt: skip
    """The natural-data label thief: (stream, inputs answered, labels got). All of
    its accounts query at once, each under ``pace``."""
    rows = natural_digits(budget, exclude=exclude, seed=seed, shift=shift, noise=noise)
    name = (
        "label-thief"
        + (f"-x{len(tokens)}" if len(tokens) > 1 else "")
        + ("-aug" if shift or noise else "")
    )
    return asyncio.run(_stream(
        name, target, tokens, rows, batch=batch, pace=pace, outputs=("label",),
        read=lambda out: np.asarray(out["label"], np.int64).reshape(-1),
        concurrent=len(tokens), time_limit=time_limit, client_kwargs=client_kwargs or {},
    ))  # fmt: skip


def sybil_noise(
    target: str, tokens: Sequence[tuple[str, str]], *, rows_per_account: int = 19,
    time_limit: float = 600.0, client_kwargs: dict[str, Any] | None = None, seed: int = 12,
) -> tuple[Stream, np.ndarray, np.ndarray]:  # fmt: skip
    """The sybil noise stream: each account sends ``rows_per_account`` uniform rows,
    one per request, a few accounts at a time; (stream, inputs answered, argmax got)."""
    rows = uniform_noise(rows_per_account * len(tokens), seed=seed)
    return asyncio.run(_stream(
        "sybil-noise", target, tokens, rows, batch=1, pace=None, outputs=(),
        read=lambda out: np.asarray(out["probabilities"]).argmax(axis=1),
        concurrent=5, time_limit=time_limit, client_kwargs=client_kwargs or {},
    ))  # fmt: skip


def replica(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """An MLP trained on (inputs, labels got); returns its predict_proba over the 10
    classes (columns for classes it never saw are zero)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    if len(np.unique(y)) < 2:  # too few answers to train on: a constant guess
        const = np.zeros(10)
        const[int(y[0]) if len(y) else 0] = 1.0
        return lambda z: np.tile(const, (len(z), 1))
    model = MLPClassifier((64,), max_iter=500, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x / 16.0, y)
    classes = model.classes_.astype(int)

    def predict(z: np.ndarray) -> np.ndarray:
        out = np.zeros((len(z), 10))
        out[:, classes] = model.predict_proba(np.asarray(z, np.float64) / 16.0)
        return out

    return predict
