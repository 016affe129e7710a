"""Limits configuration: parsing the TOML table and rejecting bad values clearly."""

from __future__ import annotations

import ipaddress
import tomllib
from datetime import UTC, datetime
from typing import Any

import pytest

from sealserve.defense.limits import (
    CostMode,
    LimitsConfig,
    LimitSet,
    Period,
    Tier,
    TokenBucket,
    window_bounds,
)
from sealserve.errors import ConfigError

EXAMPLE = """
[limits]
default_tier = "free"
trusted_proxies = ["10.0.0.0/8", "192.168.1.7"]

[limits.tiers.free]
rate = 2.5
burst = 10
per_minute = 60
per_day = 1000
per_month = 20000

[limits.tiers.pro]
rate = 50
burst = 100
per_day = 100000
cost = "batch"
per_model = true

[limits.peer]
rate = 20
burst = 40
per_minute = 600

[limits.model]
per_minute = 6000

[limits.models.resnet]
per_minute = 100
"""


def test_example_parses() -> None:
    cfg = LimitsConfig.from_mapping(tomllib.loads(EXAMPLE)["limits"])
    free = cfg.tier("free")
    assert free.limits.bucket == TokenBucket(rate=2.5, burst=10)
    assert free.limits.quotas == {Period.MINUTE: 60, Period.DAY: 1000, Period.MONTH: 20000}
    assert free.cost is CostMode.REQUEST and free.cost_of(8) == 1
    pro = cfg.tier("pro")
    assert pro.cost_of(8) == 8 and pro.per_model
    assert cfg.tier(None) is free
    assert cfg.peer.quotas == {Period.MINUTE: 600}
    assert cfg.model_limits("resnet").quotas == {Period.MINUTE: 100}
    assert cfg.model_limits("other").quotas == {Period.MINUTE: 6000}
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )


def _tiers(**free: Any) -> dict[str, Any]:
    return {"tiers": {"free": free}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_tiers(rate=0, burst=10), r"limits\.tiers\.free\.rate must be greater than zero, got 0"),
        (_tiers(rate=1, burst=-3), r"limits\.tiers\.free\.burst must be greater than zero"),
        (_tiers(rate=1, burst=1.5), r"limits\.tiers\.free\.burst must be an integer"),
        (_tiers(per_day=0), r"limits\.tiers\.free\.per_day must be greater than zero"),
        (_tiers(per_minute=-1), r"limits\.tiers\.free\.per_minute must be greater than zero"),
        (_tiers(per_month="lots"), r"per_month must be an integer, got 'lots'"),
        (_tiers(per_day=True), r"per_day must be an integer, got True"),
        (_tiers(rate=1), r"'rate' and 'burst' must be given together"),
        (_tiers(per_week=5), r"limits\.tiers\.free: unknown key\(s\) 'per_week'"),
        (_tiers(cost="tokens"), r"cost must be 'request' or 'batch', got 'tokens'"),
        (_tiers(per_model="yes"), r"per_model must be true or false"),
        ({"tiers": {}}, r"at least one tier"),
        (
            {**_tiers(per_day=5), "default_tier": "gold"},
            r"limits\.default_tier 'gold' is not a configured tier \(known: free\)",
        ),
        (
            {**_tiers(per_day=5), "peer": {"rate": float("nan"), "burst": 1}},
            r"limits\.peer\.rate must be greater than zero",
        ),
        (
            {**_tiers(per_day=5), "models": {"m": {"per_day": -2}}},
            r"limits\.models\.m\.per_day must be greater than zero",
        ),
        (
            {**_tiers(per_day=5), "trusted_proxies": ["proxy.example"]},
            r"'proxy\.example' is not an IP address or network",
        ),
        ({**_tiers(per_day=5), "quota": 1}, r"limits: unknown key\(s\) 'quota'"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LimitsConfig.from_mapping(data)


def test_unknown_tier_lookup() -> None:
    cfg = LimitsConfig(tiers={"free": Tier("free", LimitSet())})
    with pytest.raises(ConfigError, match=r"unknown tier 'gold' \(known: free\)"):
        cfg.tier("gold")
    with pytest.raises(ConfigError, match=r"unknown tier None"):
        cfg.tier(None)


def test_constructors_validate_too() -> None:
    with pytest.raises(ConfigError, match=r"limits\.rate must be greater than zero"):
        TokenBucket(rate=-1.0, burst=1)
    with pytest.raises(ConfigError, match="batch size must be at least 1"):
        Tier("t", LimitSet()).cost_of(0)


def test_window_bounds() -> None:
    t = datetime(2024, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    assert window_bounds(Period.MINUTE, t) == (t - 30, t + 30)
    assert window_bounds(Period.DAY, t) == (t - 86370, t + 30)
    start, end = window_bounds(Period.MONTH, t)
    assert start == datetime(2024, 12, 1, tzinfo=UTC).timestamp()
    assert end == datetime(2025, 1, 1, tzinfo=UTC).timestamp()


def test_a_defended_server_counts_rows_and_caps_them_by_default() -> None:
    from sealserve.defense.limits import DEFENDED_MAX_ROWS, CostMode

    plain = LimitsConfig.from_mapping({"tiers": {"free": {"per_day": 10}}})
    assert plain.tier("free").cost is CostMode.REQUEST and plain.tier("free").max_rows is None
    defended = LimitsConfig.from_mapping({"tiers": {"free": {"per_day": 10}}}, defended=True)
    tier = defended.tier("free")
    assert tier.cost is CostMode.BATCH and tier.max_rows == DEFENDED_MAX_ROWS
    # An operator's explicit choice is honoured.
    chosen = LimitsConfig.from_mapping(
        {"tiers": {"free": {"per_day": 10, "cost": "request", "max_rows": 10}}}, defended=True
    )
    assert chosen.tier("free").cost is CostMode.REQUEST and chosen.tier("free").max_rows == 10


def test_a_200000_row_request_is_refused_before_admission() -> None:
    from sealserve.defense.quota import QuotaGuard
    from sealserve.defense.store.memory import MemoryStore
    from sealserve.errors import InputError

    cfg = LimitsConfig.from_mapping({"tiers": {"free": {"rate": 5, "burst": 5}}}, defended=True)
    store = MemoryStore()
    guard = QuotaGuard(cfg, store)
    with pytest.raises(InputError, match="request has 200000 rows; tier 'free' allows at most "
                                         "4096 rows per request"):  # fmt: skip
        guard.admit("thief", "free", "127.0.0.1", "digits", batch_size=200_000, now=1000.0)
    # Nothing was consumed: the next one-row request still has the full burst.
    result = guard.admit("thief", "free", "127.0.0.1", "digits", batch_size=1, now=1000.0)
    assert next(r for r in result.remaining if r.name == "account.rate").remaining == 4


def test_max_rows_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError, match="max_rows must be greater than zero"):
        LimitsConfig.from_mapping({"tiers": {"free": {"max_rows": 0}}})
