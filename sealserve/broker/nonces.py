"""Challenge nonces: fresh, single-use, expiring.

Held in memory under a lock, which is correct for one broker process: a nonce issued by
one process can only be redeemed at that process. (Several brokers behind a load
balancer would need sticky sessions or a shared store; one broker is the design.)
A restart forgets outstanding nonces, which only makes enclaves ask again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

from sealserve.errors import OverloadedError

NONCE_LEN = 32


class NonceExpired(Exception):
    """The nonce was issued here but its time ran out (internal: reason for the log)."""


class NonceUnknown(Exception):
    """The nonce was never issued here, or was already used (internal)."""


class NonceBook:
    """Issues nonces and redeems each at most once, within ``ttl`` seconds.

    At most ``max_outstanding`` unexpired nonces exist at a time; beyond that
    :meth:`issue` raises OverloadedError (an unauthenticated caller cannot make the
    broker grow without bound).
    """

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        max_outstanding: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._max = max_outstanding
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[bytes, float] = {}

    def issue(self) -> bytes:
        """A fresh random nonce. Raises OverloadedError when too many are outstanding."""
        nonce = secrets.token_bytes(NONCE_LEN)
        now = self._clock()
        with self._lock:
            if len(self._expiry) >= self._max:
                self._sweep(now)
                if len(self._expiry) >= self._max:
                    raise OverloadedError("too many outstanding challenges; retry shortly")
            self._expiry[nonce] = now + self.ttl
        return nonce

    def redeem(self, nonce: bytes) -> None:
        """Use ``nonce`` up. Raises NonceUnknown (never issued, or already used) or
        NonceExpired. Either way the nonce cannot be redeemed again."""
        now = self._clock()
        with self._lock:
            expiry = self._expiry.pop(bytes(nonce), None)
        if expiry is None:
            raise NonceUnknown("nonce was not issued by this broker or was already used")
        if now > expiry:
            raise NonceExpired(f"nonce expired {now - expiry:.1f} s ago (ttl {self.ttl:g} s)")

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def _sweep(self, now: float) -> None:
        for nonce in [n for n, e in self._expiry.items() if now > e]:
            del self._expiry[nonce]
