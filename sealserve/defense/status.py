"""One word for an account's standing, from detection to the store to the Admin API.

:class:`Status` is the vocabulary (normal, throttled, challenged, suspended; ordered by
severity); :class:`AccountStatus` is what the state store holds for an account (the
status, its parameters, who set it, why, until when). Detection
(:mod:`sealserve.defense.escalation`) decides one, and
:meth:`sealserve.defense.quota.QuotaGuard.apply_status` writes it, for the detectors
and the Admin service alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sealserve.errors import ConfigError, quote

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DEFAULT_THROTTLE_FACTOR",
    "MAX_DIFFICULTY",
    "AccountStatus",
    "Status",
]

MAX_DIFFICULTY = 32
DEFAULT_THROTTLE_FACTOR = 0.1
"""Rate factor of a throttled account when whoever sets the status names none."""
DEFAULT_DIFFICULTY = 17
"""Proof-of-work bits of a challenged account when whoever sets the status names none
(calibrated in docs/defenses.md, "Challenges with teeth": >= 100x the serving cost of
a row from the first detected episode, with the SDK's solver)."""


class Status(StrEnum):
    """An account's standing, ordered by severity (``<`` compares severity, not text).

    The value (``"throttled"``) is the stored and Admin API word; :attr:`label`
    (``"throttle"``) names the response level in the ``[defense.response]`` policy and
    the audit log's decisions.
    """

    NORMAL = "normal"
    THROTTLED = "throttled"
    CHALLENGED = "challenged"
    SUSPENDED = "suspended"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @property
    def label(self) -> str:
        """The response level's name: ``ok``, ``throttle``, ``challenge``, ``suspend``."""
        return _LABELS[self]

    @classmethod
    def parse(cls, label: str) -> Status:
        """``"throttle"`` -> ``Status.THROTTLED``. Raises ``ConfigError`` if unknown."""
        for status, name in _LABELS.items():
            if name == label.lower():
                return status
        raise ConfigError(
            f"unknown account status {quote(label)} (expected one of {', '.join(_LABELS.values())})"
        )

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.severity < other.severity

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.severity <= other.severity

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.severity > other.severity

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Status):
            return NotImplemented
        return self.severity >= other.severity


_SEVERITY = {s: i for i, s in enumerate(Status)}
_LABELS = {
    Status.NORMAL: "ok",
    Status.THROTTLED: "throttle",
    Status.CHALLENGED: "challenge",
    Status.SUSPENDED: "suspend",
}


@dataclass(frozen=True)
class AccountStatus:
    """An account's graduated-response status, who set it, why, and until when.

    Build with the named constructors. ``expires_at`` None means it persists until
    changed. Raises ConfigError for a factor outside (0, 1] or a difficulty outside
    1..32.
    """

    kind: Status = Status.NORMAL
    factor: float | None = None
    difficulty: int | None = None
    reason: str = ""
    set_by: str = ""
    set_at: float = 0.0
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.kind is Status.THROTTLED:
            if self.factor is None or not 0 < self.factor <= 1:
                raise ConfigError(f"throttle factor must be in (0, 1], got {self.factor!r}")
        elif self.factor is not None:
            raise ConfigError(f"a {self.kind} status takes no throttle factor")
        if self.kind is Status.CHALLENGED:
            if not isinstance(self.difficulty, int) or not 1 <= self.difficulty <= MAX_DIFFICULTY:
                raise ConfigError(
                    f"challenge difficulty must be 1..{MAX_DIFFICULTY} bits, "
                    f"got {self.difficulty!r}"
                )
        elif self.difficulty is not None:
            raise ConfigError(f"a {self.kind} status takes no difficulty")

    @classmethod
    def make(
        cls,
        kind: Status,
        *,
        factor: float | None = None,
        difficulty: int | None = None,
        reason: str = "",
        set_by: str = "",
        set_at: float = 0.0,
        expires_at: float | None = None,
    ) -> AccountStatus:
        """A status of any kind; a throttle without ``factor`` gets
        :data:`DEFAULT_THROTTLE_FACTOR`, a challenge without ``difficulty``
        :data:`DEFAULT_DIFFICULTY`; a normal status never expires."""
        if kind is Status.THROTTLED and factor is None:
            factor = DEFAULT_THROTTLE_FACTOR
        if kind is Status.CHALLENGED and difficulty is None:
            difficulty = DEFAULT_DIFFICULTY
        return cls(
            kind,
            factor=factor if kind is Status.THROTTLED else None,
            difficulty=difficulty if kind is Status.CHALLENGED else None,
            reason=reason,
            set_by=set_by,
            set_at=set_at,
            expires_at=None if kind is Status.NORMAL else expires_at,
        )

    @classmethod
    def normal(cls, *, reason: str = "", set_by: str = "", set_at: float = 0.0) -> AccountStatus:
        return cls(Status.NORMAL, reason=reason, set_by=set_by, set_at=set_at)

    @classmethod
    def throttled(
        cls,
        factor: float,
        *,
        reason: str,
        set_by: str,
        set_at: float,
        expires_at: float | None = None,
    ) -> AccountStatus:
        return cls(
            Status.THROTTLED,
            factor=factor,
            reason=reason,
            set_by=set_by,
            set_at=set_at,
            expires_at=expires_at,
        )

    @classmethod
    def challenged(
        cls,
        difficulty: int,
        *,
        reason: str,
        set_by: str,
        set_at: float,
        expires_at: float | None = None,
    ) -> AccountStatus:
        return cls(
            Status.CHALLENGED,
            difficulty=difficulty,
            reason=reason,
            set_by=set_by,
            set_at=set_at,
            expires_at=expires_at,
        )

    @classmethod
    def suspended(
        cls, *, reason: str, set_by: str, set_at: float, expires_at: float | None = None
    ) -> AccountStatus:
        return cls(
            Status.SUSPENDED, reason=reason, set_by=set_by, set_at=set_at, expires_at=expires_at
        )

    def active_at(self, now: float) -> bool:
        """True while the status applies (not expired at ``now``)."""
        return self.expires_at is None or now < self.expires_at

    def effective_at_time(self, now: float) -> Status:
        """The status at ``now``: ``NORMAL`` once ``expires_at`` has passed."""
        return self.kind if self.active_at(now) else Status.NORMAL

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "factor": self.factor,
                "difficulty": self.difficulty,
                "reason": self.reason,
                "set_by": self.set_by,
                "set_at": self.set_at,
                "expires_at": self.expires_at,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> AccountStatus:
        data: dict[str, Any] = json.loads(text)
        return cls(
            Status(data["kind"]),
            factor=data["factor"],
            difficulty=data["difficulty"],
            reason=data["reason"],
            set_by=data["set_by"],
            set_at=data["set_at"],
            expires_at=data["expires_at"],
        )
