"""What the server says is left of an account's limits, with each answer.

The server sends ``sealserve-quota-remaining: account.day=995/1000,peer.minute=58/60``
(gRPC trailing metadata, REST header): ``name=remaining/limit`` per limit window that
applies to the call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from sealserve.defense.challenge import solve

QUOTA_KEY = "sealserve-quota-remaining"


@dataclass(frozen=True)
class QuotaLeft:
    """Per limit window (``"account.day"``): ``(remaining, limit)``; ``remaining`` is
    the smallest, the calls left before one of them refuses."""

    windows: Mapping[str, tuple[int, int]]

    @property
    def remaining(self) -> int:
        return min(left for left, _ in self.windows.values())

    @classmethod
    def from_header(cls, value: str) -> QuotaLeft | None:
        """Parse the header; ``None`` when it holds no well-formed window (a server
        that sends something else is not an error for the answer it came with)."""
        windows: dict[str, tuple[int, int]] = {}
        for part in value.split(",")[:32]:
            name, _, counts = part.strip().partition("=")
            left, _, limit = counts.partition("/")
            if name and left.isdigit() and limit.isdigit():
                windows[name] = (int(left), int(limit))
        return cls(windows) if windows else None

    def __str__(self) -> str:
        return ",".join(f"{n}={left}/{limit}" for n, (left, limit) in self.windows.items())


@dataclass
class PowPaid:
    """The proof of work a client paid when the server challenged it (its
    ``pow_paid``): challenges solved, hashes tried and seconds spent solving."""

    challenges: int = 0
    hashes: int = 0
    seconds: float = 0.0

    def pay(self, challenge: str) -> str:
        """Solve ``challenge`` (:func:`~sealserve.defense.challenge.solve`) and count it."""
        t0 = time.perf_counter()
        answer = solve(challenge)
        self.seconds += time.perf_counter() - t0
        self.challenges += 1
        self.hashes += int(answer) + 1  # solve tries the counters 0, 1, ... in order
        return answer
