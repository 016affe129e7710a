"""Graduated response: thresholds, hysteresis, expiry, config validation."""

from __future__ import annotations

from typing import Any

import pytest

from sealserve.defense.detect import DetectorScore
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.status import AccountStatus, Status
from sealserve.errors import ConfigError


def s(score: float, text: str = "why") -> list[DetectorScore]:
    return [
        DetectorScore("distribution", score, f"Distribution: {text}"),
        DetectorScore("volume", 0.0, "Volume: quiet"),
    ]


POLICY = ResponsePolicy.default()


def test_scores_map_to_levels_and_reason_carries_explanation() -> None:
    d = POLICY.decide_at_time(AccountStatus(), s(0.1), now=0)
    assert d.status == Status.NORMAL and not d.changed and not d.log
    assert d.reason == "no response: score 0.10"
    d = POLICY.decide_at_time(AccountStatus(), s(0.55, "37 outliers"), now=0)
    assert d.status == Status.THROTTLED and d.changed and d.escalated and d.write
    assert d.expires_at == 3600.0
    assert d.reason.startswith("escalated to throttle: score 0.55 >= 0.5")
    assert "Distribution: 37 outliers" in d.reason and "Volume" not in d.reason
    d = POLICY.decide_at_time(AccountStatus(), s(0.99), now=0)
    assert d.status == Status.SUSPENDED  # strong evidence skips levels


def test_hysteresis_holds_until_below_down_then_steps_down() -> None:
    cur = AccountStatus.make(Status.CHALLENGED, expires_at=10_000.0)
    d = POLICY.decide_at_time(cur, s(0.65), now=100)
    assert d.status == Status.CHALLENGED and not d.changed and d.renewed and d.write
    assert d.expires_at == 100 + 6 * 3600.0
    assert d.reason.startswith("challenge held: score 0.65 >= 0.6")
    d = POLICY.decide_at_time(cur, s(0.4), now=100)
    assert d.status == Status.THROTTLED and d.changed and not d.escalated
    assert d.reason.startswith("de-escalated from challenge to throttle: score 0.40 < 0.6")
    d = POLICY.decide_at_time(cur, s(0.1), now=100)
    assert d.status == Status.NORMAL and d.expires_at is None and d.log  # changes are logged


def test_expired_status_lapses_to_ok() -> None:
    cur = AccountStatus.make(Status.SUSPENDED, expires_at=500.0)
    assert cur.effective_at_time(499) == Status.SUSPENDED
    assert cur.effective_at_time(500) == Status.NORMAL
    d = POLICY.decide_at_time(cur, s(0.2), now=600)
    assert d.previous == Status.NORMAL and d.status == Status.NORMAL and not d.changed
    assert d.write  # the store still says suspend: clear it
    d = POLICY.decide_at_time(cur, s(0.6), now=600)
    assert d.status == Status.THROTTLED and d.escalated


def test_custom_policy_without_some_levels() -> None:
    p = ResponsePolicy.from_mapping(
        {"log_at": 0.2, "levels": {"suspend": {"up": 0.9, "down": 0.5, "duration_s": 60}}}
    )
    assert p.decide_at_time(AccountStatus(), s(0.8), now=0).status == Status.NORMAL
    d = p.decide_at_time(AccountStatus(), s(0.9), now=0)
    assert d.status == Status.SUSPENDED and d.expires_at == 60


@pytest.mark.parametrize(
    ("data", "msg"),
    [
        ({"levels": {}, "extra": 1}, r"unknown keys \['extra'\]"),
        ({"levels": []}, "levels must be a mapping"),
        ({"levels": {}}, "at least one level"),
        (
            {"levels": {"ban": {"up": 1, "down": 0, "duration_s": 1}}},
            "unknown account status 'ban'",
        ),
        ({"levels": {"ok": {"up": 1, "down": 0, "duration_s": 1}}}, "'ok' is not a level"),
        (
            {"levels": {"throttle": {"up": 0.5, "down": 0.5, "duration_s": 1}}},
            r"down must be in \[0, up=0.5\)",
        ),
        (
            {"levels": {"throttle": {"up": 1.5, "down": 0.5, "duration_s": 1}}},
            r"up must be in \(0, 1\]",
        ),
        (
            {"levels": {"throttle": {"up": 0.5, "down": 0.1, "duration_s": 0}}},
            "duration_s must be positive",
        ),
        (
            {"levels": {"throttle": {"up": "x", "down": 0.1, "duration_s": 1}}},
            "up must be a number",
        ),
        ({"levels": {"throttle": {"up": 0.5, "down": 0.1}}}, r"missing keys \['duration_s'\]"),
        (
            {
                "levels": {
                    "throttle": {"up": 0.8, "down": 0.5, "duration_s": 1},
                    "suspend": {"up": 0.6, "down": 0.5, "duration_s": 1},
                }
            },
            "suspend must not be below throttle",
        ),
        (
            {"log_at": 2, "levels": {"throttle": {"up": 0.5, "down": 0.1, "duration_s": 1}}},
            "log_at",
        ),
    ],
)
def test_config_errors(data: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        ResponsePolicy.from_mapping(data)
