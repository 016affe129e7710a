"""Rate-limit and quota configuration: per-tier, per-peer and per-model limits.

Every class here is a frozen dataclass that validates itself when built, so a
:class:`LimitsConfig` that exists is a valid one. :meth:`LimitsConfig.from_mapping` turns
the ``[limits]`` table of the server's TOML settings into one (the shape is documented in
docs/quotas.md) and raises :class:`~sealserve.errors.ConfigError` naming the bad key.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sealserve.errors import ConfigError, InputError, quote

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Period(StrEnum):
    """A fixed quota window. Windows are aligned to UTC; a month is a calendar month."""

    MINUTE = "minute"
    DAY = "day"
    MONTH = "month"


def window_bounds(period: Period, now: float) -> tuple[float, float]:
    """Return ``(start, end)`` (Unix seconds, UTC) of the ``period`` window holding ``now``."""
    if period is Period.MINUTE:
        start = math.floor(now / 60.0) * 60.0
        return start, start + 60.0
    if period is Period.DAY:
        start = math.floor(now / 86400.0) * 86400.0
        return start, start + 86400.0
    return _month_of_day(math.floor(now / 86400.0))


@functools.lru_cache(maxsize=64)
def _month_of_day(day: int) -> tuple[float, float]:
    # Memoised: every admit needs the month's bounds and datetime arithmetic is slow.
    moment = datetime.fromtimestamp(day * 86400.0, UTC)
    first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    nxt = datetime(moment.year + (moment.month == 12), moment.month % 12 + 1, 1, tzinfo=UTC)
    return first.timestamp(), nxt.timestamp()


DEFENDED_MAX_ROWS = 4096
"""A tier's default cap on rows per request when the server defends its models."""


class CostMode(StrEnum):
    """How much of a quota one request uses: always 1, or the request's batch size."""

    REQUEST = "request"
    BATCH = "batch"


def _positive(where: str, name: str, value: object, *, integer: bool) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{name} must be {kind}, got {value!r}")
    assert isinstance(value, int | float)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}.{name} must be greater than zero, got {value!r}")


@dataclass(frozen=True)
class TokenBucket:
    """A token bucket: refills ``rate`` tokens per second up to ``burst`` tokens."""

    rate: float
    burst: int
    where: str = field(default="limits", compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive(self.where, "rate", self.rate, integer=False)
        _positive(self.where, "burst", self.burst, integer=True)


@dataclass(frozen=True)
class LimitSet:
    """The limits that apply to one subject (an account, a peer address or a model).

    ``bucket`` is the rate limit; ``quotas`` maps each configured window to its limit.
    Raises ConfigError when a quota is not a positive integer.
    """

    bucket: TokenBucket | None = None
    quotas: Mapping[Period, int] = field(default_factory=dict)
    where: str = field(default="limits", compare=False, repr=False)

    def __post_init__(self) -> None:
        for period, limit in self.quotas.items():
            if not isinstance(period, Period):
                raise ConfigError(f"{self.where}: unknown quota window {period!r}")
            _positive(self.where, f"per_{period.value}", limit, integer=True)
        object.__setattr__(self, "quotas", dict(self.quotas))

    @property
    def empty(self) -> bool:
        return self.bucket is None and not self.quotas

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> LimitSet:
        """Build from ``{rate, burst, per_minute, per_day, per_month}`` (all optional)."""
        _known(data, {"rate", "burst", "per_minute", "per_day", "per_month"}, where)
        return cls._from_known(data, where=where)

    @classmethod
    def _from_known(cls, data: Mapping[str, Any], *, where: str) -> LimitSet:
        bucket = None
        if "rate" in data or "burst" in data:
            if "rate" not in data or "burst" not in data:
                raise ConfigError(f"{where}: 'rate' and 'burst' must be given together")
            bucket = TokenBucket(rate=data["rate"], burst=data["burst"], where=where)
        quotas = {p: data[f"per_{p.value}"] for p in Period if f"per_{p.value}" in data}
        return cls(bucket=bucket, quotas=quotas, where=where)


@dataclass(frozen=True)
class Tier:
    """An account tier: its name, the limits each account of the tier gets, how requests
    are weighed (``cost``), and whether the account's limits are counted separately for
    each model (``per_model``) or shared across models."""

    name: str
    limits: LimitSet
    cost: CostMode = CostMode.REQUEST
    per_model: bool = False
    max_rows: int | None = None
    """The most rows one request may carry (None: no cap); checked before inference."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"tier name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.cost, CostMode):
            raise ConfigError(f"limits.tiers.{self.name}.cost must be 'request' or 'batch'")
        if self.max_rows is not None:
            _positive(f"limits.tiers.{self.name}", "max_rows", self.max_rows, integer=True)

    def check_rows(self, rows: int) -> None:
        """Refuse a request of more rows than the tier allows. Raises InputError."""
        if self.max_rows is not None and rows > self.max_rows:
            raise InputError(
                f"request has {rows} rows; tier {self.name!r} allows at most "
                f"{self.max_rows} rows per request: split it into smaller requests"
            )

    def cost_of(self, batch_size: int) -> int:
        """The quota units one request of ``batch_size`` items uses under this tier."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        return batch_size if self.cost is CostMode.BATCH else 1

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any], *, defended: bool = False) -> Tier:
        """Build from the tier's table. ``defended``: the server defends its models, so
        by default a tier counts rows (``cost = "batch"``) and caps a request at
        :data:`DEFENDED_MAX_ROWS` rows."""
        where = f"limits.tiers.{name}"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a table")
        _known(
            data,
            {"rate", "burst", "per_minute", "per_day", "per_month", "cost", "per_model",
             "max_rows"},
            where,
        )  # fmt: skip
        cost_raw = data.get("cost", "batch" if defended else "request")
        try:
            cost = CostMode(cost_raw)
        except ValueError:
            raise ConfigError(
                f"{where}.cost must be 'request' or 'batch', got {cost_raw!r}"
            ) from None
        per_model = data.get("per_model", False)
        if not isinstance(per_model, bool):
            raise ConfigError(f"{where}.per_model must be true or false, got {per_model!r}")
        limits = LimitSet._from_known(data, where=where)
        max_rows = data.get("max_rows", DEFENDED_MAX_ROWS if defended else None)
        return cls(name=name, limits=limits, cost=cost, per_model=per_model, max_rows=max_rows)


@dataclass(frozen=True)
class LimitsConfig:
    """All limits: tiers by name, per-peer-address limits, per-model limits.

    ``peer`` applies to every peer address (counted per address, across accounts).
    ``model`` applies to every model (counted per model, across accounts) unless
    ``models`` has an entry for that model. ``trusted_proxies`` lists the proxies whose
    forwarded-for header is believed (see :mod:`sealserve.defense.peer`). ``lease``:
    admit requests whose limits are all quota windows from slices leased to this
    replica for up to ``lease_s`` seconds (:mod:`sealserve.defense.lease`).
    Raises ConfigError for no tiers, an unknown ``default_tier`` or a tier stored under
    another name.
    """

    tiers: Mapping[str, Tier]
    peer: LimitSet = field(default_factory=LimitSet)
    model: LimitSet = field(default_factory=LimitSet)
    models: Mapping[str, LimitSet] = field(default_factory=dict)
    default_tier: str | None = None
    trusted_proxies: tuple[IPNetwork, ...] = ()
    lease: bool = False
    lease_s: float = 1.0
    #: The ``[limits]`` table as written (what the workload manifest records).
    table: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.lease_s, int | float) and 0 < self.lease_s <= 60):
            raise ConfigError(f"limits.lease_s must be a number in (0, 60], got {self.lease_s!r}")
        if not self.tiers:
            raise ConfigError("limits.tiers must define at least one tier")
        for name, tier in self.tiers.items():
            if tier.name != name:
                raise ConfigError(f"limits.tiers.{name} holds a tier named {tier.name!r}")
        if self.default_tier is not None and self.default_tier not in self.tiers:
            raise ConfigError(
                f"limits.default_tier {self.default_tier!r} is not a configured tier "
                f"(known: {', '.join(sorted(self.tiers))})"
            )
        object.__setattr__(self, "tiers", dict(self.tiers))
        object.__setattr__(self, "models", dict(self.models))

    def tier(self, name: str | None) -> Tier:
        """The tier called ``name`` (``None``: the default tier).

        Raises ConfigError when there is no such tier.
        """
        key = self.default_tier if name is None else name
        if key is None or key not in self.tiers:
            shown = quote(name) if name is not None else None
            raise ConfigError(f"unknown tier {shown} (known: {', '.join(sorted(self.tiers))})")
        return self.tiers[key]

    def model_limits(self, model: str) -> LimitSet:
        """The limits counted for ``model`` across all accounts."""
        return self.models.get(model, self.model)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, defended: bool = False) -> LimitsConfig:
        """Build from the ``[limits]`` TOML table (docs/quotas.md). ``defended``: the
        server defends its models (tiers count rows and cap them by default).

        Raises ConfigError naming the key for unknown keys, wrong types, zero or
        negative limits and an unknown default tier.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("limits must be a table")
        _known(
            data,
            {"tiers", "peer", "model", "models", "default_tier", "trusted_proxies", "lease",
             "lease_s"},
            "limits",
        )  # fmt: skip
        tiers_raw = data.get("tiers", {})
        if not isinstance(tiers_raw, Mapping):
            raise ConfigError("limits.tiers must be a table of tiers")
        tiers = {
            name: Tier.from_mapping(name, t, defended=defended) for name, t in tiers_raw.items()
        }
        peer = LimitSet.from_mapping(_table(data, "peer"), where="limits.peer")
        model = LimitSet.from_mapping(_table(data, "model"), where="limits.model")
        models_raw = _table(data, "models")
        models = {
            name: LimitSet.from_mapping(
                _table(models_raw, name, "limits.models"), where=f"limits.models.{name}"
            )
            for name in models_raw
        }
        default = data.get("default_tier")
        if default is not None and not isinstance(default, str):
            raise ConfigError(f"limits.default_tier must be a string, got {default!r}")
        proxies_raw = data.get("trusted_proxies", [])
        if not isinstance(proxies_raw, list):
            raise ConfigError("limits.trusted_proxies must be a list of addresses or networks")
        proxies = []
        for item in proxies_raw:
            try:
                proxies.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ConfigError(
                    f"limits.trusted_proxies: {item!r} is not an IP address or network"
                ) from None
        lease = data.get("lease", False)
        if not isinstance(lease, bool):
            raise ConfigError(f"limits.lease must be true or false, got {lease!r}")
        lease_s = data.get("lease_s", 1.0)
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float):
            raise ConfigError(f"limits.lease_s must be a number, got {lease_s!r}")
        return cls(
            tiers=tiers,
            peer=peer,
            model=model,
            models=models,
            default_tier=default,
            trusted_proxies=tuple(proxies),
            lease=lease,
            lease_s=float(lease_s),
            table=dict(data),
        )


def _known(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _table(data: Mapping[str, Any], key: str, where: str = "limits") -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.{key} must be a table")
    return value
