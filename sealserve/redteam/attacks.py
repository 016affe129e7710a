"""Model-extraction attacks. Each spends an ``Oracle``'s budget and returns a replica,
calling ``checkpoint(replica)`` along the way (for fidelity-against-queries curves).

- ``EquationSolving``  Tramèr et al., "Stealing Machine Learning Models via Prediction
  APIs", USENIX Security 2016, section 4.1: for a softmax model log p_i - log p_j is
  linear in x, so d+1 answers per class ratio determine the weights; least squares.
- ``RandomQueries``    uniform queries over the input box, replica on the answers.
- ``JacobianAugmentation``  Papernot et al., "Practical Black-Box Attacks against
  Machine Learning", AsiaCCS 2017: seeds, then x + lambda * sign(d substitute_c / dx)
  for the oracle's class c, doubling the set each round (lambda alternates sign).
- ``Knockoff``         Orekondy et al., "Knockoff Nets", CVPR 2019 (random strategy):
  natural queries from a surrogate distribution that differs from the victim's.
- ``NoiseAveraging``   each input asked several times, exactly and jittered; answers
  averaged to cancel output noise.
- ``Rotation``         another attack spread over every account and connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sealserve.redteam import data
from sealserve.redteam.oracle import Oracle
from sealserve.redteam.replica import LinearSoftmax, Replica, fit_linear, fit_mlp

Checkpoint = Callable[[Replica], None]


class Attack(Protocol):
    """``name`` for reports; ``accounts``: how many of the given accounts it uses
    (None: all); ``connections`` per account; ``marks``: query counts at which to
    checkpoint besides the attack's own schedule."""

    name: str
    accounts: int | None
    connections: int

    @property
    def marks(self) -> tuple[int, ...]: ...

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica: ...


def _schedule(budget: int, first: int, extra: tuple[int, ...] = ()) -> list[int]:
    """Cumulative query counts at which to train and checkpoint: doubling up to
    ``budget``, plus the ``extra`` marks below it."""
    marks, m = set(), max(1, first)
    while m < budget:
        marks.add(m)
        m *= 2
    return sorted(marks | {e for e in extra if 0 < e < budget} | {budget})


def _collect(
    oracle: Oracle,
    make: Callable[[int], np.ndarray],
    fit: Callable[[np.ndarray, np.ndarray], Replica],
    checkpoint: Checkpoint,
    first: int,
    extra: tuple[int, ...] = (),
) -> Replica | None:
    """Query ``make(n)`` inputs in doubling chunks; fit and checkpoint after each."""
    xs: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    replica: Replica | None = None
    asked = 0
    for mark in _schedule(oracle.remaining, first, extra):
        if oracle.exhausted:
            break
        x = make(mark - asked)
        asked = mark
        got = oracle.query(x)
        xs.append(x[got.admitted])
        ps.append(got.probs[got.admitted])
        n = sum(len(a) for a in xs)
        if n >= 2:
            replica = fit(np.concatenate(xs), np.concatenate(ps))
            checkpoint(replica)
    return replica


class _Constant:
    """Says the same class for everything: what an attacker has with no answers."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.zeros((len(x), 10))
        p[:, 0] = 1.0
        return p

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x), np.int64)


@dataclass
class EquationSolving:
    """Recover W, b of p = softmax(xW + b) by least squares on centred log-probs.

    Uses ``max_queries`` answers (default: the whole budget; d+1 = 65 suffice for an
    exact softmax victim, more absorb output noise). For a non-linear victim it
    yields the best linear approximation under the query distribution: ``pool``
    (default; natural digits the attacker holds, 5 per class, jittered by N(0, 2)) or
    ``uniform`` over the box (Tramèr's setting)."""

    name: str = "equation"
    inputs: str = "pool"
    max_queries: int | None = None
    seed: int = 0
    accounts: int | None = 1
    connections: int = 1
    marks: tuple[int, ...] = ()  # extra checkpoints (query counts)

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        rng = np.random.default_rng(self.seed)
        d = 64
        total = oracle.remaining if self.max_queries is None else self.max_queries
        total = min(total, oracle.remaining)
        pool = data.natural_pool(5, rng)[0] if self.inputs == "pool" else None

        def make(n: int) -> np.ndarray:
            if pool is None:
                return data.uniform(n, rng)
            x = pool[rng.integers(len(pool), size=n)] + rng.normal(0, 2.0, size=(n, d))
            return np.clip(x, 0, 16).astype(np.float32)

        xs: list[np.ndarray] = []
        ps: list[np.ndarray] = []
        replica: Replica = _Constant()
        asked = 0
        for mark in _schedule(total, d + 1, self.marks):
            if oracle.exhausted:
                break
            x = make(mark - asked)
            asked = mark
            got = oracle.query(x)
            xa, pa = got.kept(x)
            xs.append(xa.astype(np.float64))
            ps.append(pa)
            if sum(len(a) for a in xs) >= d + 1:
                replica = solve_linear(np.concatenate(xs), np.concatenate(ps))
                checkpoint(replica)
        return replica


#: Answers below this are treated as underflow (FP32 softmax) or perturbation, not data.
TINY = 1e-30


def solve_linear(x: np.ndarray, probs: np.ndarray) -> LinearSoftmax:
    """Least-squares W, b with log p_j - log p_r = x (w_j - w_r) + (b_j - b_r), where r
    is each row's top class (always well measured) and only answers above ``TINY`` give
    equations (a zero cannot be inverted). Class 0's weights are fixed at zero (softmax
    is invariant to a shift common to every class). Normal equations, accumulated per
    (class, reference) pair, so memory stays O((d+1)^2 k^2) whatever the query count."""
    n, d = x.shape
    k = probs.shape[1]
    a = np.hstack([x.astype(np.float64), np.ones((n, 1))])
    logp = np.log(np.clip(probs.astype(np.float64), TINY, None))
    ref = probs.argmax(axis=1)
    m = d + 1
    gram = np.zeros((k * m, k * m))
    rhs = np.zeros(k * m)
    for r in range(k):
        rows = ref == r
        for j in range(k):
            sel = rows & (probs[:, j] > TINY) if j != r else np.zeros(n, bool)
            if not sel.any():
                continue
            xs = a[sel]
            g = xs.T @ xs
            v = xs.T @ (logp[sel, j] - logp[sel, r])
            bj, br = slice(j * m, (j + 1) * m), slice(r * m, (r + 1) * m)
            gram[bj, bj] += g
            gram[br, br] += g
            gram[bj, br] -= g
            gram[br, bj] -= g
            rhs[bj] += v
            rhs[br] -= v
    free = slice(m, k * m)  # class 0 is the gauge
    theta = np.zeros(k * m)
    theta[free] = np.linalg.lstsq(gram[free, free], rhs[free], rcond=None)[0]
    t = theta.reshape(k, m).T  # (d + 1, k)
    return LinearSoftmax(t[:-1], t[-1])


@dataclass
class RandomQueries:
    """Uniform noise over [0, 16]^64, soft-label MLP replica."""

    name: str = "random"
    seed: int = 0
    accounts: int | None = 1
    connections: int = 1
    marks: tuple[int, ...] = ()  # extra checkpoints (query counts)

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        rng = np.random.default_rng(self.seed)
        fit = _mlp_fitter(self.seed)
        make = lambda n: data.uniform(n, rng)  # noqa: E731
        return _collect(oracle, make, fit, checkpoint, 125, self.marks) or _Constant()


def _mlp_fitter(seed: int) -> Callable[[np.ndarray, np.ndarray], Replica]:
    def fit(x: np.ndarray, p: np.ndarray) -> Replica:
        return fit_mlp(x, p, seed=seed)

    return fit


@dataclass
class JacobianAugmentation:
    """Seeds (``seeds_per_class`` natural digits from the attacker's pool), then
    Jacobian-based augmentation rounds with a linear softmax substitute (analytic
    gradient); the final replica is a soft-label MLP on everything collected."""

    name: str = "jacobian"
    seeds_per_class: int = 5
    step: float = 1.6  # Papernot's lambda = 0.1 on a [0, 1] scale
    seed: int = 0
    accounts: int | None = 1
    connections: int = 1
    marks: tuple[int, ...] = ()  # extra checkpoints (query counts)

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        rng = np.random.default_rng(self.seed)
        x_new = data.natural_pool(self.seeds_per_class, rng)[0]
        xs = np.empty((0, 64), np.float32)
        ps = np.empty((0, 10))
        replica: Replica = _Constant()
        sign = 1.0
        while not oracle.exhausted:
            if len(x_new) > oracle.remaining:
                x_new = x_new[rng.permutation(len(x_new))[: oracle.remaining]]
            # Checkpoint at the round's end and at any extra mark inside the round.
            start = oracle.ledger.admitted
            cuts = [m - start for m in self.marks if 0 < m - start < len(x_new)]
            for part in np.split(x_new, cuts):
                got = oracle.query(part)
                xa, pa = got.kept(part)
                xs, ps = np.concatenate([xs, xa]), np.concatenate([ps, pa])
                if len(xs) >= 2:
                    replica = fit_mlp(xs, ps, seed=self.seed)
                    checkpoint(replica)
            if len(xs) < 2:
                break
            substitute = fit_linear(xs, ps)
            grad = substitute.class_gradient(xs, ps.argmax(axis=1))
            x_new = np.clip(xs + sign * self.step * np.sign(grad), 0, 16).astype(np.float32)
            sign = -sign  # Papernot's periodic step size keeps points near the seeds
        return replica


@dataclass
class Knockoff:
    """Natural queries from a surrogate distribution (``data.surrogate``: photograph
    patches and distorted digits from a 3-per-class pool), soft-label MLP replica."""

    name: str = "knockoff"
    pool_per_class: int = 3
    seed: int = 0
    accounts: int | None = 1
    connections: int = 1
    marks: tuple[int, ...] = ()  # extra checkpoints (query counts)

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        rng = np.random.default_rng(self.seed)
        pool = data.natural_pool(self.pool_per_class, rng)[0]
        fit = _mlp_fitter(self.seed)
        make = lambda n: data.surrogate(n, pool, rng)  # noqa: E731
        return _collect(oracle, make, fit, checkpoint, 125, self.marks) or _Constant()


@dataclass
class NoiseAveraging:
    """Each base input (distorted pool digits) is asked ``repeats`` times: half exact
    repeats, half jittered by N(0, ``jitter``); the mean answer is the training label."""

    name: str = "averaging"
    repeats: int = 4
    jitter: float = 0.5
    pool_per_class: int = 3
    seed: int = 0
    accounts: int | None = 1
    connections: int = 1
    marks: tuple[int, ...] = ()  # extra checkpoints (query counts)

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        rng = np.random.default_rng(self.seed)
        pool = data.natural_pool(self.pool_per_class, rng)[0]
        r = max(1, self.repeats)
        xs: list[np.ndarray] = []
        ps: list[np.ndarray] = []
        replica: Replica = _Constant()
        done = 0
        marks = tuple(m // r for m in self.marks)
        for mark in _schedule(max(1, oracle.remaining // r), 32, marks):
            if oracle.exhausted:
                break
            base = data.transformed(pool, mark - done, rng)
            done = mark
            exact = np.repeat(base, (r + 1) // 2, axis=0)
            jittered = np.repeat(base, r // 2, axis=0)
            jittered = np.clip(jittered + rng.normal(0, self.jitter, jittered.shape), 0, 16)
            owner = np.concatenate(
                [
                    np.repeat(np.arange(len(base)), (r + 1) // 2),
                    np.repeat(np.arange(len(base)), r // 2),
                ]
            )
            got = oracle.query(np.concatenate([exact, jittered]).astype(np.float32))
            sums = np.zeros((len(base), 10))
            counts = np.zeros(len(base))
            np.add.at(sums, owner[got.admitted], got.probs[got.admitted])
            np.add.at(counts, owner[got.admitted], 1)
            seen = counts > 0
            xs.append(base[seen])
            ps.append(sums[seen] / counts[seen, None])
            if sum(len(a) for a in xs) >= 2:
                replica = fit_mlp(np.concatenate(xs), np.concatenate(ps), seed=self.seed)
                checkpoint(replica)
        return replica


@dataclass
class Rotation:
    """``inner`` (default: Knockoff) spread over every account, ``connections`` each."""

    name: str = "rotation"
    inner: Attack = field(default_factory=Knockoff)
    accounts: int | None = None
    connections: int = 2

    @property
    def marks(self) -> tuple[int, ...]:
        return self.inner.marks

    def run(self, oracle: Oracle, checkpoint: Checkpoint) -> Replica:
        return self.inner.run(oracle, checkpoint)


def with_marks(attack: Attack, marks: tuple[int, ...]) -> Attack:
    """A copy of ``attack`` that also checkpoints at ``marks`` (query counts)."""
    from dataclasses import replace

    if isinstance(attack, Rotation):
        return replace(attack, inner=with_marks(attack.inner, marks))
    return replace(attack, marks=marks)  # type: ignore[type-var]


def all_attacks(seed: int = 0) -> dict[str, Attack]:
    """Every attack, by name, with default parameters."""
    attacks: list[Attack] = [
        EquationSolving(seed=seed),
        RandomQueries(seed=seed),
        JacobianAugmentation(seed=seed),
        Knockoff(seed=seed),
        NoiseAveraging(seed=seed),
        Rotation(inner=Knockoff(seed=seed)),
    ]
    return {a.name: a for a in attacks}
