"""Small per-peer bookkeeping for the gRPC edge, bounded whatever clients send.

The peer is the transport address without its port (a client opens as many
connections as it likes). Each table holds at most ``capacity`` peers and forgets the
oldest first, so a flood of addresses costs a fixed amount of memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from sealserve.defense.peer import parse_transport_peer

DEFAULT_CAPACITY = 4096


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5123`` -> ``10.0.0.1``; anything unparseable as given (short)."""
    addr = parse_transport_peer(peer)
    return str(addr) if addr is not None else peer[:64]


class _Bounded:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, list[float]] = OrderedDict()

    def _get(self, key: str, default: list[float]) -> list[float]:
        item = self._items.get(key)
        if item is None:
            item = default
            self._items[key] = item
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return item

    def __len__(self) -> int:
        return len(self._items)


class PeerLog(_Bounded):
    """Logs an event at most once per peer per ``interval_s``, with the count skipped."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 60.0,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(capacity)
        self._log = logger
        self._interval = interval_s
        self._clock = clock

    def warning(self, peer: str, message: str) -> bool:
        """Log ``message`` for ``peer`` unless it was logged within the interval.

        Returns whether a line was written. No traceback is ever attached.
        """
        host = peer_host(peer)
        now = self._clock()
        state = self._get(host, [-float("inf"), 0.0])  # [last logged, skipped since]
        if now - state[0] < self._interval:
            state[1] += 1
            return False
        skipped = int(state[1])
        state[0], state[1] = now, 0.0
        more = f" ({skipped} more since the last line)" if skipped else ""
        self._log.warning("%s from %s%s", message, host, more)
        return True


class PeerRate(_Bounded):
    """A token bucket per peer: ``per_minute`` calls a minute, bursts up to ``burst``."""

    def __init__(
        self,
        per_minute: int,
        *,
        burst: int | None = None,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(capacity)
        self._rate = per_minute / 60.0
        self._burst = float(burst if burst is not None else max(1, per_minute))
        self._clock = clock

    def take(self, peer: str) -> float:
        """Take one call for ``peer``: 0.0 when allowed, else seconds until one is."""
        now = self._clock()
        state = self._get(peer_host(peer), [self._burst, now])  # [tokens, updated]
        tokens = min(self._burst, state[0] + (now - state[1]) * self._rate)
        state[1] = now
        if tokens >= 1.0:
            state[0] = tokens - 1.0
            return 0.0
        state[0] = tokens
        return (1.0 - tokens) / self._rate if self._rate > 0 else float("inf")
