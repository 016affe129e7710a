"""Volume: sustained request rate and total against the tier's normal profile.

Extraction needs many queries. The detector counts an account's requests in
``buckets`` fixed time slots covering the last ``window_s`` seconds (default one hour
in 60 one-minute slots) plus the running total, and compares them with the tier's
profile: ``normal_per_window`` (what a busy honest account of this tier sends) and
``burst_per_window`` (the rate at which the score reaches 0.5, the flag point), and
likewise ``normal_total`` / ``flag_total`` for the total. Each ramp is linear: 0 at
the normal value, 0.5 at the flag value, 1 at twice the flag distance.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sealserve.defense.detect.base import DetectorScore, require
from sealserve.defense.detect.cache import load_state, save_state
from sealserve.defense.detect.prada import _from_mapping
from sealserve.defense.detect.state import BlobStore, state_key
from sealserve.errors import UnavailableError

_KIND = 4


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    """Tier profile for :class:`VolumeDetector`."""

    normal_per_window: float = 1000.0
    burst_per_window: float = 5000.0
    normal_total: float = 100_000.0
    flag_total: float = 1_000_000.0
    window_s: float = 3600.0
    buckets: int = 60
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        require(self.normal_per_window > 0, "volume.normal_per_window must be positive")
        require(
            self.burst_per_window > self.normal_per_window,
            "volume.burst_per_window must exceed normal_per_window",
        )
        require(self.normal_total > 0, "volume.normal_total must be positive")
        require(self.flag_total > self.normal_total, "volume.flag_total must exceed normal_total")
        require(self.window_s > 0, "volume.window_s must be positive")
        require(1 <= self.buckets <= 3600, "volume.buckets must be in 1..3600")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> VolumeConfig:
        """Build from a config mapping. Raises ``ConfigError`` on unknown/bad keys."""
        result: VolumeConfig = _from_mapping(cls, data, "volume")
        return result


def _explain(cfg: VolumeConfig, recent: int, total: int) -> str:
    window = f"{cfg.window_s / 3600:g} h" if cfg.window_s >= 3600 else f"{cfg.window_s:g} s"
    return (
        f"Volume: {recent} requests in the last {window} (normal "
        f"{cfg.normal_per_window:g}, flag at {cfg.burst_per_window:g}); {total} in total "
        f"(normal {cfg.normal_total:g}, flag at {cfg.flag_total:g})"
    )


def _ramp(value: float, normal: float, flag: float) -> float:
    return min(1.0, max(0.0, 0.5 * (value - normal) / (flag - normal)))


class VolumeDetector:
    """Request rate and total per (account, model)."""

    name = "volume"

    def __init__(self, config: VolumeConfig, store: BlobStore) -> None:
        self.config = config
        self.store = store
        self._slot_s = config.window_s / config.buckets

    def observe(self, account: str, model: str, x: object, label: object) -> DetectorScore:
        return self.observe_at_time(account, model, x, label, now=time.time())

    def observe_at_time(
        self, account: str, model: str, x: object, label: object, *, now: float
    ) -> DetectorScore:
        """Count one request at ``now``. The input is not inspected (any input counts)."""
        cfg = self.config
        key = state_key("volume", model, account)
        state = load_state(self.store, key, _KIND)
        if state is None:
            # [total, slot index of the newest bucket]
            meta: npt.NDArray[Any] = np.zeros(2, np.int64)
            counts: npt.NDArray[Any] = np.zeros(cfg.buckets, np.int64)
        else:
            meta, counts = state
            if counts.shape != (cfg.buckets,):
                raise UnavailableError(f"detector state under {key!r} has another configuration")
        slot = int(now // self._slot_s)
        age = slot - int(meta[1])
        if age >= cfg.buckets or state is None:
            counts[:] = 0
        elif age > 0:
            for s in range(int(meta[1]) + 1, slot + 1):
                counts[s % cfg.buckets] = 0
        meta[1] = max(slot, int(meta[1]))
        if age > -cfg.buckets:  # a late report from another replica still counts if recent
            counts[slot % cfg.buckets] += 1
        meta[0] += 1
        save_state(self.store, key, _KIND, [meta, counts], ttl_s=cfg.ttl_s)
        recent, total = int(counts.sum()), int(meta[0])
        s_rate = _ramp(recent, cfg.normal_per_window, cfg.burst_per_window)
        s_total = _ramp(total, cfg.normal_total, cfg.flag_total)
        return DetectorScore(
            self.name,
            max(s_rate, s_total),
            lambda: _explain(cfg, recent, total),
            metrics={"recent": float(recent), "total": float(total)},
        )
