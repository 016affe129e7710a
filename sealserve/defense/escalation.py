"""Graduated response: detector scores -> account status, with hysteresis and expiry.

The policy is pure: it reads the account's current status (which the caller fetched
from the state store) and the detectors' scores, and returns a :class:`Decision` that
the caller applies through the store's set-status and records in the audit log.

Levels, from mild to severe: ``throttle``, ``challenge``, ``suspend`` (``ok`` is the
absence of a response). Each level has

* ``up``: escalate to this level when the combined score (the highest detector
  score) reaches it;
* ``down``: leave this level only when the score falls below it (``down < up``:
  hysteresis, so an account hovering at a threshold does not flap);
* ``duration_s``: how long the status holds; every observation that still supports
  the level renews it, and once it lapses without renewal the account is back to
  ``ok`` (expiry, for accounts that stop querying).

Config shape (``ResponsePolicy.from_mapping``)::

    {"log_at": 0.3,
     "levels": {"throttle":  {"up": 0.5,  "down": 0.35, "duration_s": 3600},
                "challenge": {"up": 0.75, "down": 0.6,  "duration_s": 21600},
                "suspend":   {"up": 0.95, "down": 0.85, "duration_s": 86400}}}

A level may be left out (that response is never used). Detector scores are built so
that 0.5 is each detector's own flag point, so ``throttle.up = 0.5`` throttles as soon
as any detector flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sealserve.defense.detect.base import DetectorScore
from sealserve.defense.status import AccountStatus, Status
from sealserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Level:
    """Thresholds and hold time of one response level."""

    up: float
    down: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one observation.

    ``status``/``expires_at`` are what the caller writes to the store when ``write``
    is true. ``changed`` is a status change (record it in the audit log); ``renewed``
    means the same non-ok status was extended. ``log`` says the observation is worth an audit flag
    even without a status change; ``reason`` names the level, the score and the
    detectors' explanations.
    """

    status: Status
    previous: Status
    expires_at: float | None
    score: float
    changed: bool
    renewed: bool
    write: bool
    log: bool
    reason: str

    @property
    def escalated(self) -> bool:
        return self.status > self.previous


DEFAULT_BATCH_ROWS = 32
"""A request of at least this many rows is judged before it is answered."""
DEFAULT_LIFT_GRACE_S = 3600.0
"""How long an operator's lift or forgiveness holds against detection."""
DEFAULT_REPEAT_BITS = 2
"""Bits a detection challenge gains per earlier episode of suspicion (4x the work)."""
DEFAULT_COHORT_DIFFICULTY = 9
"""Bits of the challenge a young account of a flagged cohort answers until its own
rows graduate it (~1.7x an honest account's cost per row: docs/defenses.md)."""

_DEFAULT: dict[str, Any] = {
    "log_at": 0.3,
    "levels": {
        "throttle": {"up": 0.5, "down": 0.35, "duration_s": 3600.0},
        "challenge": {"up": 0.75, "down": 0.6, "duration_s": 6 * 3600.0},
        "suspend": {"up": 0.95, "down": 0.85, "duration_s": 24 * 3600.0},
    },
}


class ResponsePolicy:
    """Maps combined detector scores to account statuses (see the module docstring)."""

    def __init__(self, levels: Mapping[Status, Level], *, log_at: float) -> None:
        """Validate and keep the levels. Raises ``ConfigError`` if inconsistent."""
        if Status.NORMAL in levels:
            raise ConfigError("response: 'ok' is not a level; it is the absence of one")
        if not levels:
            raise ConfigError("response: at least one level is required")
        if not (0.0 <= log_at <= 1.0):
            raise ConfigError(f"response.log_at must be in [0, 1], got {log_at}")
        previous: tuple[Status, Level] | None = None
        for status in sorted(levels):
            lv = levels[status]
            name = status.label
            for field in ("up", "down", "duration_s"):
                v = getattr(lv, field)
                if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                    raise ConfigError(f"response.levels.{name}.{field} must be a number")
            if not (0.0 < lv.up <= 1.0):
                raise ConfigError(f"response.levels.{name}.up must be in (0, 1], got {lv.up}")
            if not (0.0 <= lv.down < lv.up):
                raise ConfigError(
                    f"response.levels.{name}.down must be in [0, up={lv.up}), got {lv.down}"
                )
            if not (lv.duration_s > 0 and math.isfinite(lv.duration_s)):
                raise ConfigError(f"response.levels.{name}.duration_s must be positive")
            if previous is not None and not (
                lv.up >= previous[1].up and lv.down >= previous[1].down
            ):
                raise ConfigError(
                    f"response.levels.{name} must not be below {previous[0].label} "
                    "(thresholds rise with severity)"
                )
            previous = (status, lv)
        self.levels = dict(sorted(levels.items()))
        self.log_at = float(log_at)

    @classmethod
    def default(cls) -> ResponsePolicy:
        """The policy of the module docstring."""
        return cls.from_mapping(_DEFAULT)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ResponsePolicy:
        """Build from ``{"log_at": .., "levels": {name: {up, down, duration_s}}}``.

        Raises ``ConfigError`` naming the bad key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("response config must be a mapping")
        unknown = sorted(set(data) - {"log_at", "levels"})
        if unknown:
            raise ConfigError(f"response: unknown keys {unknown} (known: log_at, levels)")
        raw_levels = data.get("levels")
        if not isinstance(raw_levels, Mapping):
            raise ConfigError("response.levels must be a mapping of level name -> thresholds")
        levels: dict[Status, Level] = {}
        for name, spec in raw_levels.items():
            status = Status.parse(str(name))
            if not isinstance(spec, Mapping):
                raise ConfigError(f"response.levels.{name} must be a mapping")
            extra = sorted(set(spec) - {"up", "down", "duration_s"})
            missing = sorted({"up", "down", "duration_s"} - set(spec))
            if extra or missing:
                raise ConfigError(
                    f"response.levels.{name}: unknown keys {extra}, missing keys {missing}"
                )
            levels[status] = Level(up=spec["up"], down=spec["down"], duration_s=spec["duration_s"])
        log_at = data.get("log_at", 0.3)
        if isinstance(log_at, bool) or not isinstance(log_at, int | float):
            raise ConfigError("response.log_at must be a number")
        return cls(levels, log_at=float(log_at))

    def decide(self, current: AccountStatus, scores: Sequence[DetectorScore]) -> Decision:
        """Decide now; see :meth:`decide_at_time`."""
        return self.decide_at_time(current, scores, now=time.time())

    def decide_at_time(
        self, current: AccountStatus, scores: Sequence[DetectorScore], *, now: float
    ) -> Decision:
        """Apply the thresholds to the highest score in ``scores`` at time ``now``."""
        score = max((s.score for s in scores), default=0.0)
        prev = current.effective_at_time(now)
        target = Status.NORMAL
        for status, lv in self.levels.items():
            if score >= lv.up:
                target = status
        if target > prev:
            new = target
            why = f"escalated to {target.label}: score {score:.2f} >= {self.levels[target].up:g}"
        elif prev != Status.NORMAL and score >= self._level(prev).down:
            new = prev
            why = f"{prev.label} held: score {score:.2f} >= {self._level(prev).down:g}"
        elif prev != Status.NORMAL:
            new = Status.NORMAL
            for status, lv in self.levels.items():
                if status < prev and score >= lv.down:
                    new = status
            why = f"de-escalated from {prev.label} to {new.label}: score {score:.2f} < " + (
                f"{self._level(prev).down:g}"
            )
        else:
            new, why = Status.NORMAL, f"no response: score {score:.2f}"
        expires = None if new == Status.NORMAL else now + self._level(new).duration_s
        flagged = sorted((s for s in scores if s.score >= self.log_at), key=lambda s: -s.score)
        if flagged:
            why += "; " + "; ".join(s.explanation for s in flagged)
        return Decision(
            status=new,
            previous=prev,
            expires_at=expires,
            score=score,
            changed=new != prev,
            renewed=new != Status.NORMAL and new == prev,
            write=new != prev or new != current.kind or new != Status.NORMAL,
            log=score >= self.log_at or new != prev,
            reason=why,
        )

    def _level(self, status: Status) -> Level:
        lv = self.levels.get(status)
        if lv is None:
            # A status set by an operator for a level this policy does not use: hold it
            # until it expires.
            return Level(up=1.0, down=0.0, duration_s=3600.0)
        return lv
