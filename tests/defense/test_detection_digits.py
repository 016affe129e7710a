"""Detection on the digits demo task: every extraction stream is flagged within 1,000
queries, honest accounts never are.

Thresholds are the detectors' defaults, tuned on split A of the in-task held-out
images (bench/bench_detect.py --tune); these tests use split B. "Flagged" means the
default response policy moves the account to throttle or worse. The honest test runs
100 accounts x 1,000 queries (bench/bench_detect.py runs the full 100 x 2,000).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from sealserve.defense.detect import (
    DetectorSuite,
    DistributionConfig,
    DistributionDetector,
    MemoryBlobStore,
    PradaConfig,
    PradaDetector,
    VolumeConfig,
    VolumeDetector,
)
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.status import AccountStatus, Status
from tests.defense.streams import (
    digits_task,
    honest_stream,
    jacobian_stream,
    off_task_stream,
    uniform_stream,
)


def make_suite(store: MemoryBlobStore) -> DetectorSuite:
    task = digits_task()
    return DetectorSuite(
        [
            PradaDetector(PradaConfig(n_features=64, n_classes=5), store),
            DistributionDetector(
                DistributionConfig(n_features=64, n_classes=5),
                store,
                task.reference,
                reference_labels=task.predict(task.reference),
            ),
            VolumeDetector(VolumeConfig(), store),
        ]
    )


def first_flag(
    suite: DetectorSuite,
    account: str,
    x: npt.NDArray[np.float64],
    *,
    rate_per_hour: float,
    policy: ResponsePolicy | None = None,
) -> tuple[int | None, str]:
    """1-based index of the query at which the account is throttled (or None), and the
    reason given then."""
    policy = policy or ResponsePolicy.default()
    labels = digits_task().predict(x)
    status = AccountStatus()
    for i in range(x.shape[0]):
        now = 1_000_000.0 + i * 3600.0 / rate_per_hour
        result = suite.observe_at_time(account, "digits", x[i], int(labels[i]), now=now)
        decision = policy.decide_at_time(status, result.scores, now=now)
        if decision.write:
            status = AccountStatus.make(decision.status, expires_at=decision.expires_at)
        if decision.status >= Status.THROTTLED:
            return i + 1, decision.reason
    return None, ""


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("stream", ["uniform", "jacobian", "off_task"])
def test_extraction_streams_are_flagged_within_1000_queries(stream: str, seed: int) -> None:
    task = digits_task()
    rng = np.random.default_rng(seed)
    x = {
        "uniform": lambda: uniform_stream(1000, rng),
        "jacobian": lambda: jacobian_stream(task, 1000, lam=1.6 if seed == 11 else 0.8),
        "off_task": lambda: off_task_stream(task, 1000, rng),
    }[stream]()
    flagged_at, reason = first_flag(
        make_suite(MemoryBlobStore()), f"attacker-{stream}", x, rate_per_hour=3600
    )
    assert flagged_at is not None and flagged_at <= 1000, f"{stream} not flagged"
    assert "escalated to " in reason
    assert "Distribution:" in reason or "PRADA:" in reason


def test_prada_alone_flags_jacobian_augmentation_early() -> None:
    """The paper's case: synthetic steps around seeds are caught by the W test."""
    task = digits_task()
    store = MemoryBlobStore()
    prada = DetectorSuite([PradaDetector(PradaConfig(n_features=64, n_classes=5), store)])
    flagged_at, reason = first_flag(prada, "jbda", jacobian_stream(task, 1000), rate_per_hour=3600)
    assert flagged_at is not None and flagged_at <= 200
    assert "below the threshold 0.780" in reason


def test_honest_accounts_are_never_flagged() -> None:
    task = digits_task()
    pool = task.split_b
    labels = task.predict(pool)
    rng = np.random.default_rng(2024)
    suite = make_suite(MemoryBlobStore())
    flagged = []
    worst = 0.0
    for account in range(100):
        x = honest_stream(pool, labels, 1000, rng)
        rate = float(rng.uniform(20, 900))  # varied rates, within the tier's profile
        at, _ = first_flag(suite, f"honest-{account}", x, rate_per_hour=rate)
        if at is not None:
            flagged.append(account)
        worst = max(worst, 0.0 if at is None else 1.0)
    assert flagged == [], f"honest accounts flagged: {flagged}"
