"""Detectors on bad input, config validation and explanations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sealserve.defense.detect import (
    DetectorScore,
    DetectorSuite,
    DistributionConfig,
    DistributionDetector,
    MemoryBlobStore,
    PradaConfig,
    PradaDetector,
    VolumeConfig,
    VolumeDetector,
)
from sealserve.errors import ConfigError
from tests.defense.streams import digits_task


def _suite(store: MemoryBlobStore) -> DetectorSuite:
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


@pytest.mark.parametrize(
    ("x", "label", "why"),
    [
        (np.zeros(63), 0, "63 features, expected 64"),
        (np.zeros((8, 9)), 0, "72 features, expected 64"),
        (np.full(64, np.nan), 0, "NaN or infinity"),
        (np.full(64, np.inf), 0, "NaN or infinity"),
        ("not a tensor", 0, "not numeric"),
        (None, 0, "1 features, expected 64"),
        ([[1, 2], [3]], 0, "not numeric"),
        (np.zeros(64), 7, "label 7 outside 0..4"),
        (np.zeros(64), -1, "label -1 outside 0..4"),
        (np.zeros(64), 1.5, "label is not an integer"),
        (np.zeros(64), "cat", "label is not an integer"),
        (np.zeros(64), True, "label is not an integer"),
        (np.full(64, 1e6), 0, "overflow float16"),
    ],
)
def test_bad_input_never_crashes_and_leaves_state_alone(x: object, label: object, why: str) -> None:
    store = MemoryBlobStore()
    suite = _suite(store)
    good = digits_task().split_b[0]
    suite.observe_at_time("a", "m", good, 0, now=0.0)
    before = {k: store.get_blob(k) for k in ("detect/prada/m/a", "detect/distribution/m/a")}
    result = suite.observe_at_time("a", "m", x, label, now=1.0)
    explanations = {s.detector: s.explanation for s in result.scores}
    if why != "overflow float16":
        assert why in explanations["distribution"]
    assert why in explanations["prada"]
    assert all(0.0 <= s.score <= 1.0 for s in result.scores)
    # Shape/NaN problems leave the state untouched (volume still counts the request).
    assert store.get_blob("detect/prada/m/a") == before["detect/prada/m/a"]


def test_scores_are_bounded_and_explained() -> None:
    with pytest.raises(ValueError, match="outside"):
        DetectorScore("x", 1.5, "too much")
    with pytest.raises(ValueError, match="outside"):
        DetectorScore("x", math.nan, "nan")


def test_not_ready_until_enough_evidence() -> None:
    store = MemoryBlobStore()
    suite = _suite(store)
    x = digits_task().split_b[:5]
    result = suite.observe_at_time("a", "m", x[0], 0, now=0.0)
    by = {s.detector: s for s in result.scores}
    assert not by["prada"].ready and "testing starts after" in by["prada"].explanation
    assert not by["distribution"].ready and "queries needed" in by["distribution"].explanation
    assert by["volume"].ready and "1 requests in the last 1 h" in by["volume"].explanation
    flags = result.flags()
    assert set(flags) >= {"prada", "distribution", "volume", "volume.total"}


def test_volume_ramps_with_rate_and_forgets_old_traffic() -> None:
    det = VolumeDetector(
        VolumeConfig(normal_per_window=10, burst_per_window=20, window_s=60, buckets=6),
        MemoryBlobStore(),
    )
    for i in range(20):
        s = det.observe_at_time("a", "m", None, None, now=100.0 + i)
    assert s.score == pytest.approx(0.5 * 10 / 10)
    assert "20 requests in the last 60 s" in s.explanation
    later = det.observe_at_time("a", "m", None, None, now=1000.0)
    assert later.score == 0.0 and "1 requests in the last 60 s" in later.explanation
    assert "21 in total" in later.explanation


@pytest.mark.parametrize(
    ("cls", "data", "msg"),
    [
        (PradaConfig, {"n_features": 4, "n_classes": 2, "delta": 1.5}, "delta must be in"),
        (PradaConfig, {"n_features": 4, "n_classes": 2, "bogus": 1}, "unknown keys \\['bogus'\\]"),
        (PradaConfig, {"n_features": 4}, "prada: .*n_classes"),
        (
            PradaConfig,
            {"n_features": 100000, "n_classes": 1000},
            "state_budget_bytes too small",
        ),
        (DistributionConfig, {"n_features": 4, "quantile": 2}, "quantile must be in"),
        (DistributionConfig, {"n_features": 4, "value_range": [3, 1]}, "high > low"),
        (DistributionConfig, {"n_features": 4, "value_range": "x"}, "value_range must be"),
        (VolumeConfig, {"burst_per_window": 1}, "must exceed normal_per_window"),
    ],
)
def test_config_errors_name_the_key(cls: type, data: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        cls.from_mapping(data)  # type: ignore[attr-defined]


def test_distribution_reference_is_validated() -> None:
    cfg = DistributionConfig(n_features=4)
    with pytest.raises(ConfigError, match=r"must be \(n >= 20, 4\); got \(5, 4\)"):
        DistributionDetector(cfg, MemoryBlobStore(), np.zeros((5, 4)))
    bad = np.zeros((30, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        DistributionDetector(cfg, MemoryBlobStore(), bad)
    with pytest.raises(ConfigError, match="reference_labels has 3 rows, expected 30"):
        DistributionDetector(cfg, MemoryBlobStore(), np.ones((30, 4)), reference_labels=[0, 1, 2])


def test_suite_rejects_duplicates() -> None:
    store = MemoryBlobStore()
    v = VolumeDetector(VolumeConfig(), store)
    with pytest.raises(ConfigError, match="duplicate detector names"):
        DetectorSuite([v, v])
    with pytest.raises(ConfigError, match="at least one detector"):
        DetectorSuite([])


def test_distribution_state_budget_is_enforced() -> None:
    with pytest.raises(ConfigError, match="over state_budget_bytes=200000: lower window or bins"):
        DistributionConfig(n_features=3072)
    assert DistributionConfig(n_features=3072, window=50, bins=4).window == 50
