"""Detection beside the request path (release/beside.py): groups observed in order on
the loop or in a worker thread, an admission that waits for its account's verdict,
backpressure instead of dropping, a failing group that does not stop detection, and a
graceful close that observes what is queued."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from sealserve.defense.release.beside import DetectionWorker, Observation

DIGEST = "0" * 64


def _obs(account: str, rows: int = 1, i: int = 0) -> Observation:
    x = np.full((rows, 2), float(i))
    return Observation(account, None, "m", x, np.zeros((rows, 3)), DIGEST, DIGEST, float(i), "grpc")


@pytest.mark.parametrize("off_loop", [False, True])
def test_groups_run_beside_in_order_and_close_drains(off_loop: bool) -> None:
    seen: list[float] = []
    threads: set[str] = set()

    def observe(group: Sequence[Observation]) -> None:
        threads.add(threading.current_thread().name)
        seen.extend(o.now for o in group)

    worker = DetectionWorker(observe, max_group=16, off_loop=off_loop)

    async def main() -> None:
        for i in range(100):
            worker.submit(_obs(f"a{i % 3}", i=i))
        assert seen == []  # nothing observed on the request path
        for _ in range(200):
            if worker.observed == 100:
                break
            await asyncio.sleep(0.01)
        for i in range(100, 120):  # queued again after the task went idle
            worker.submit(_obs("a0", i=i))

    asyncio.run(main())
    beside = set(threads)
    worker.close()  # whatever is still queued is observed at close
    assert seen == [float(i) for i in range(120)]
    assert worker.observed == 120 and not worker.pending("a0")
    # On the loop's thread, or only in worker threads with a store that does I/O.
    assert (beside == {threading.main_thread().name}) != off_loop, beside
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(_obs("a0"))


def test_a_full_queue_is_observed_by_the_request_nothing_is_dropped() -> None:
    seen: list[float] = []
    worker = DetectionWorker(lambda g: seen.extend(o.now for o in g), max_pending=4)

    async def main() -> None:
        for i in range(4):
            worker.submit(_obs("a", i=i))
        assert seen == []
        worker.submit(_obs("a", i=4))  # over max_pending: this request observes the queue
        assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]
        worker.submit(_obs("a", rows=9, i=5))  # one request over the cap on its own
        assert seen[-1] == 5.0 and worker.queued_rows == 0

    asyncio.run(main())
    worker.close()


def test_a_failing_group_is_logged_and_detection_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def observe(group: Sequence[Observation]) -> None:
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("store down")

    worker = DetectionWorker(observe, max_group=1)
    worker.submit(_obs("a"))  # no loop: observed at once
    worker.submit(_obs("a"))
    worker.close()
    assert calls == [1, 1] and not worker.pending("a") and worker.observed == 2
    assert "detection of 1 queued request(s) failed" in caplog.text


def test_settled_observes_the_account_first_on_the_loop() -> None:
    seen: list[str] = []
    worker = DetectionWorker(lambda g: seen.extend(o.account for o in g), max_group=1)

    async def main() -> None:
        assert await worker.settled("nobody", 0.01)
        worker.submit(_obs("x"))
        worker.submit(_obs("y"))
        worker.submit(_obs("x"))
        # The next admission of "x" does not wait for the scheduled task: x's rows
        # (and those queued before them) are observed now.
        assert await worker.settled("x", 1)
        assert seen == ["x", "y", "x"] and not worker.pending("x")

    asyncio.run(main())
    worker.close()


def test_settled_waits_for_the_worker_thread_off_the_loop() -> None:
    gate = threading.Event()

    def observe(group: Sequence[Observation]) -> None:
        gate.wait(10)

    worker = DetectionWorker(observe, max_group=1, off_loop=True)

    async def main() -> None:
        worker.submit(_obs("slow"))
        await asyncio.sleep(0.05)  # the group is in the worker thread, at the gate
        assert not await worker.settled("slow", 0.1)  # a store that hangs: fail closed
        asyncio.get_running_loop().call_later(0.05, gate.set)
        assert await worker.settled("slow", 5)

    asyncio.run(main())
    worker.close()
