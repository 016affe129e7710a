"""The young-account cohort (release/cohort.py): an episode starts with a sybil noise
stream and ends with honest newcomers' rows, without locking newcomers out meanwhile."""

from __future__ import annotations

import numpy as np
import pytest

from sealserve.defense.config import DefenseConfig
from sealserve.defense.detect import MemoryBlobStore
from sealserve.defense.detect.base import DetectorScore
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.limits import LimitsConfig
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.release.cohort import (
    COHORT_REASON,
    CohortWatch,
    cohort_name,
    own_score,
    own_verdict,
)
from sealserve.defense.status import Status
from sealserve.defense.store.memory import MemoryStore
from sealserve.errors import ConfigError
from tests.defense.streams import DigitsTask, digits_task, uniform_stream
from tests.defense.test_detection_digits import make_suite

COHORT = cohort_name("free", "digits")


class World:
    """One tier's young accounts seen by the cohort view, as the pipeline does it."""

    def __init__(self) -> None:
        self.task: DigitsTask = digits_task()
        self.suite = make_suite(MemoryBlobStore())
        cfg = LimitsConfig.from_mapping({"tiers": {"free": {"rate": 1000, "burst": 1000}}})
        self.quota = QuotaGuard(cfg, MemoryStore())
        self.watch = CohortWatch(ResponsePolicy.default(), self.quota, difficulty=16)
        self.now = 1000.0

    def send(self, account: str, x: np.ndarray) -> bool:
        """One row of ``account``; whether its cohort holds it (challenged)."""
        self.now += 1.0
        label = int(self.task.model.predict(x[None, :])[0])
        result = self.suite.observe_at_time(account, "digits", x, label, now=self.now)
        return self.watch.observe(
            self.suite, account=account, tier="free", model="digits", x=x[None, :],
            labels=np.array([label]), own=own_score([result]), now=self.now,
        )  # fmt: skip

    def status(self, account: str) -> Status:
        return self.quota.status(account, now=self.now).effective_at_time(self.now)

    def flood(self, rng: np.random.Generator, accounts: int, *, first: int = 0) -> None:
        """Sybils of 19 noise rows each that stop when challenged (no proof of work)."""
        for n in range(first, first + accounts):
            for x in uniform_stream(19, rng):
                if self.send(f"sybil-{n}", x):
                    break


def _score(queries: int, outliers: int, log10_p: float) -> DetectorScore:
    metrics = {"queries": float(queries), "outliers": float(outliers), "log10_p": log10_p}
    return DetectorScore("distribution", 0.0, "", ready=False, metrics=metrics)


def test_own_verdict() -> None:
    assert own_verdict(None, graduate_rows=5) == "unknown"
    assert own_verdict(_score(1, 1, -1.3), graduate_rows=5) == "unknown"
    assert own_verdict(_score(2, 2, -2.6), graduate_rows=5) == "suspect"
    assert own_verdict(_score(4, 0, 0.0), graduate_rows=5) == "unknown"
    assert own_verdict(_score(5, 1, -0.65), graduate_rows=5) == "natural"
    assert own_verdict(_score(5, 3, -2.9), graduate_rows=5) == "suspect"


def test_the_sybil_stream_flags_the_cohort_before_it_completes() -> None:
    w = World()
    w.flood(np.random.default_rng(19), 50)
    assert w.status(COHORT) >= Status.CHALLENGED
    assert w.watch.alerts >= 1
    late = w.quota.status("sybil-49", now=w.now)
    assert late.kind is Status.CHALLENGED and late.reason.startswith(COHORT_REASON)


def test_honest_newcomers_end_the_episode_within_200_natural_rows() -> None:
    # The DoS: before, every newcomer stayed challenged for the cohort's 6 h hold.
    w = World()
    w.flood(np.random.default_rng(19), 50)
    natural = w.task.split_b
    rows = 0
    for n in range(60):
        account = f"newcomer-{n}"
        held = [w.send(account, natural[(5 * n + i) % len(natural)]) for i in range(5)]
        rows += 5
        # Held while its own rows are too few to judge, then graduated.
        assert not held[-1], (n, held)
        assert w.status(account) is Status.NORMAL
        if n == 0:
            assert held[0]  # the cohort was flagged: the first row is challenged, cheaply
        if w.status(COHORT) < Status.CHALLENGED:
            break
    assert w.status(COHORT) < Status.CHALLENGED, "the cohort never stepped down"
    assert rows <= 200, rows
    # From now on a newcomer is not challenged at all.
    assert not w.send("late", natural[0])


def test_a_held_newcomer_is_released_when_the_episode_ends() -> None:
    w = World()
    w.flood(np.random.default_rng(19), 50)
    natural = w.task.split_b
    assert w.send("shy", natural[0])  # one row, then gone for a while
    shy = w.quota.status("shy", now=w.now)
    assert shy.kind is Status.CHALLENGED and shy.difficulty == 9
    for n in range(60):
        for i in range(5):
            w.send(f"newcomer-{n}", natural[(5 * n + i + 1) % len(natural)])
        if w.status(COHORT) < Status.CHALLENGED:
            break
    assert not w.send("shy", natural[1])
    shy = w.quota.status("shy", now=w.now)
    assert shy.kind is Status.NORMAL and shy.reason == "the cohort's episode is over"


def test_a_continuing_sybil_stream_keeps_the_cohort_flagged() -> None:
    w = World()
    rng = np.random.default_rng(23)
    w.flood(rng, 50)
    natural = w.task.split_b
    for n in range(60):
        for i in range(5):
            w.send(f"newcomer-{n}", natural[(5 * n + i) % len(natural)])
        w.flood(rng, 1, first=100 + n)  # a fresh sybil per newcomer
        assert w.status(COHORT) >= Status.CHALLENGED, n
        assert w.status(f"newcomer-{n}") is Status.NORMAL
    # A sybil that pays the newcomers' cheap work is held at the full difficulty from
    # its second noise row, and stays held when the episode ends.
    noise = uniform_stream(3, rng)
    assert w.send("payer", noise[0])
    assert w.quota.status("payer", now=w.now).difficulty == 9
    assert w.send("payer", noise[1])
    payer = w.quota.status("payer", now=w.now)
    assert payer.difficulty == 16 and "look like noise (2 of 2" in payer.reason


def test_cohort_difficulty_is_configured_and_bounded() -> None:
    cfg = DefenseConfig.parse({})
    assert cfg.cohort_challenge_difficulty == 9 < cfg.challenge_difficulty
    for bad in (0, 33, "hard"):
        with pytest.raises(ConfigError, match="cohort_challenge_difficulty"):
            DefenseConfig.parse({"cohort_challenge_difficulty": bad})
