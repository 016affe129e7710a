"""Detection beside the request path: observations queued, observed in groups.

With ``[defense] detection_mode = "beside"`` the answer to a small request (fewer rows
than ``batch_scoring_rows``) goes out as soon as it is perturbed and watermarked; its
rows are queued here and observed afterwards (detectors, the graduated response, the
cohort view), a group of requests at a time, and the group's query records are
appended to the audit log with one write. What detection decides is a status in the
state store, which the next admission applies on every replica, as before.

Where the groups run: on the event loop, between requests (a task started when the
queue stops being empty); with a state store that waits on I/O (SQLite, Redis), in a
worker thread, one group at a time, so a slow store cannot stall the loop. No thread of
our own: a Python thread would wake and contend for the interpreter on every request,
costing more than the detection it moves.

What keeps it exact:

- *The account's next admission on this replica waits* until none of the account's
  rows is queued or being observed (:meth:`DetectionWorker.settled`; on the loop it
  simply observes them there and then): a client that sends its next request after its
  last answer meets the verdict its last rows earned, as with detection on the request
  path. (Requests an account sends concurrently were never judged on each other's
  rows.) Another replica sees the status once it is written: within a group of the
  answer instead of before it.
- *Nothing is dropped.* The queue is bounded (``max_pending`` rows); the request that
  would overflow it observes the queue itself first (backpressure), so a flood slows
  down instead of going unobserved.
- *The audit record of an answer follows it within a group*: a crash (kill -9) can
  lose the records of the answers still queued, at most ``max_pending`` rows; a
  graceful stop observes the queue first (:meth:`DetectionWorker.close`).

A batch of ``batch_scoring_rows`` or more is the exception: it is scored before its
answer is released, on the request path (off the event loop), as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("sealserve.defense")

DEFAULT_MAX_PENDING = 4096
"""Rows queued for detection before a request observes the queue itself."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One answered request's rows, to be observed and recorded."""

    account: str
    tier: str | None
    model: str
    x: np.ndarray
    """The rows as the detectors read them: (rows, features) float64."""
    probs: np.ndarray
    """The defended output as inference produced it (before perturbation)."""
    input_sha256: str
    output_sha256: str
    now: float
    protocol: str

    @property
    def rows(self) -> int:
        return len(self.x)


class DetectionWorker:
    """Runs ``observe`` on groups of queued :class:`Observation`, oldest first.

    ``off_loop``: run the groups in a worker thread (a store that waits on I/O).
    An exception ``observe`` raises is logged and its group counted as observed (a
    store outage must not stop detection for good)."""

    def __init__(
        self,
        observe: Callable[[Sequence[Observation]], None],
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_group: int = 256,
        off_loop: bool = False,
    ) -> None:
        if max_pending < 1 or max_group < 1:
            raise ValueError("max_pending and max_group must be positive")
        self._observe = observe
        self._max_pending = max_pending
        self._max_group = max_group
        self._off_loop = off_loop
        self._lock = threading.Lock()  # the queue and the counts
        self._order = threading.Lock()  # one group observed at a time, in queue order
        self._queue: deque[Observation] = deque()
        self._queued_rows = 0
        # account -> its requests queued or being observed; who waits for it to be 0.
        self._pending: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # The loop the groups are scheduled on: the one the worker is built on (the
        # server's), or the first one a request is submitted from.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.observed = 0
        """Requests observed so far."""

    # -- the request side -------------------------------------------------------------

    def submit(self, obs: Observation) -> None:
        """Queue ``obs`` (from the event loop or a worker thread). Over ``max_pending``
        rows, observes the queue first, in the caller. Raises RuntimeError once closed."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with self._lock:
            if self._closed:
                raise RuntimeError("the detection worker is closed")
            self._queue.append(obs)
            self._queued_rows += obs.rows
            self._pending[obs.account] = self._pending.get(obs.account, 0) + 1
            if running is not None:
                self._loop = running
            full = self._queued_rows > self._max_pending
            start = not self._scheduled and not full and self._loop is not None
            if start:
                self._scheduled = True
        if full or self._loop is None:
            self.drain()  # backpressure (or no loop to run groups on: now)
        elif start:
            if running is self._loop:
                self._loop.call_soon(self._start)
            else:
                self._loop.call_soon_threadsafe(self._start)

    def pending(self, account: str) -> bool:
        """Whether requests of ``account`` are queued or being observed."""
        return account in self._pending

    async def settled(self, account: str, timeout_s: float) -> bool:
        """Return once none of ``account``'s requests is queued or being observed (on
        the loop, by observing the queue now; off it, by waiting at most ``timeout_s``
        for the worker thread). False when it timed out."""
        if account not in self._pending:
            return True
        if not self._off_loop and not self._order.locked():
            while account in self._pending and self._queue:
                self._drain_group()
            return account not in self._pending
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if account not in self._pending:
                return True
            self._waiters.setdefault(account, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return False
        return True

    def drain(self) -> None:
        """Observe everything queued, in the caller (backpressure, a graceful stop)."""
        while self._queue:
            self._drain_group()

    def close(self) -> None:
        """Observe what is queued and take no more (a graceful stop)."""
        with self._lock:
            self._closed = True
        self.drain()
        if self._task is not None:
            self._task.cancel()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # -- the groups -----------------------------------------------------------------------

    def _start(self) -> None:
        assert self._loop is not None
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._scheduled = False
                        return
                if self._off_loop:
                    await asyncio.to_thread(self._drain_group)
                else:
                    self._drain_group()
                    await asyncio.sleep(0)  # requests waiting go first
        except asyncio.CancelledError:
            with self._lock:
                self._scheduled = False
            raise

    def _drain_group(self) -> None:
        with self._order:
            with self._lock:
                n = min(len(self._queue), self._max_group)
                group = [self._queue.popleft() for _ in range(n)]
                self._queued_rows -= sum(o.rows for o in group)
            if not group:
                return
            try:
                self._observe(group)
            except Exception:
                log.exception("detection of %d queued request(s) failed", len(group))
            woken: list[asyncio.Future[None]] = []
            with self._lock:
                self.observed += len(group)
                for obs in group:
                    left = self._pending[obs.account] - 1
                    if left:
                        self._pending[obs.account] = left
                    else:
                        del self._pending[obs.account]
                        woken += self._waiters.pop(obs.account, ())
        for fut in woken:
            loop = fut.get_loop()
            with contextlib.suppress(RuntimeError):  # a loop already closed
                loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
