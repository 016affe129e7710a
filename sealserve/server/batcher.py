"""Dynamic batching: coalesce concurrent requests to one model into one ``run``.

Requests whose inputs agree on every dimension but the first are concatenated along
axis 0, run together, and the outputs are split back by row ranges, so each caller
gets exactly what an unbatched run would give. The queue is bounded: when it is full
the request is refused with :class:`OverloadedError` instead of waiting without limit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sealserve.errors import OverloadedError, TensorError
from sealserve.server.metrics import Metrics
from sealserve.server.repository import BatchingConfig
from sealserve.server.types import ModelInfo


class BatchableModel(Protocol):
    """What the batcher needs of a loaded model (``engine.LoadedModel`` is one)."""

    info: ModelInfo
    output_names: list[str]

    def run(
        self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ()
    ) -> list[np.ndarray]: ...

    def warmup_us(self, runs: int = 5) -> float | None: ...


log = logging.getLogger("sealserve.batcher")


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)


def _to_ort(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in inputs.items():
        if arr.dtype == np.object_:
            # An object array of str, never fixed-width: a numpy unicode array pads every
            # element to the longest (count x 4 x longest bytes from one long element).
            flat = arr.reshape(-1)
            text = np.empty(flat.shape[0], dtype=np.object_)
            try:
                for i, item in enumerate(flat):
                    text[i] = item.decode() if isinstance(item, bytes) else str(item)
            except UnicodeDecodeError as exc:
                raise TensorError(f"input '{name}': BYTES element is not UTF-8 text") from exc
            arr = text.reshape(arr.shape)
        out[name] = arr
    return out


class Batcher:
    """Runs one model version's requests, inline or through a batching queue."""

    def __init__(
        self,
        model: BatchableModel,
        config: BatchingConfig,
        executor: Executor,
        metrics: Metrics,
    ) -> None:
        self._model = model
        self._cfg = config
        self._executor = executor
        self._metrics = metrics
        labels = (model.info.name, model.info.version)
        self._m_batch = metrics.batch_size.labels(*labels)
        self._m_queue = metrics.queue_time.labels(*labels)
        self._names = model.output_names
        self._all_names = tuple(self._names)
        # No BYTES inputs: arrays go to onnxruntime as they are.
        self._plain = all(s.datatype != "BYTES" for s in model.info.inputs)
        self._batching = config.max_batch_size > 1 and model.info.batchable
        if config.max_batch_size > 1 and not model.info.batchable:
            log.warning(
                "model %s: batching requested but inputs/outputs lack a dynamic first "
                "dimension; batching disabled",
                model.info.name,
            )
        if config.execution == "auto":
            us = model.warmup_us()
            self._inline = us is not None and us < config.inline_threshold_us
        else:
            self._inline = config.execution == "inline"
        if self._batching:
            self._inline = False
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending = 0
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._last_batch = 1

    def describe(self) -> str:
        if self._batching:
            return (
                f"dynamic, max_batch_size={self._cfg.max_batch_size}, "
                f"max_queue_delay_us={self._cfg.max_queue_delay_us}"
            )
        return "off, " + ("inline" if self._inline else "worker thread")

    @property
    def inline(self) -> bool:
        """Whether requests run on the caller's thread (:meth:`run_inline`), not queued."""
        return self._inline

    def run_inline(
        self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Run one request on the caller's thread (a model cheaper than a thread hop)."""
        names = outputs or self._all_names
        self._m_batch.observe(1)
        results = self._model.run(inputs if self._plain else _to_ort(inputs), names)
        return dict(zip(names, results, strict=True))

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Run one request; returns the requested outputs (all when none requested)."""
        if self._inline:
            return self.run_inline(inputs, outputs)
        names = outputs or self._all_names
        if self._pending >= self._cfg.max_queue_size:
            raise OverloadedError(
                f"model '{self._model.info.name}' queue is full "
                f"({self._cfg.max_queue_size} requests waiting)"
            )
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            if not self._batching:
                feed = _to_ort(inputs)
                res = await loop.run_in_executor(self._executor, self._model.run, feed, names)
                self._m_batch.observe(1)
                return dict(zip(names, res, strict=True))
            rows = next(iter(inputs.values())).shape[0] if inputs else 1
            key = tuple(inputs[n].shape[1:] for n in sorted(inputs))
            item = _Item(inputs, rows, key, loop.create_future())
            self._queue.append(item)
            if self._worker is None or self._worker.done():
                self._wakeup = asyncio.Event()
                self._worker = loop.create_task(self._work())
            elif self._wakeup is not None:
                self._wakeup.set()
            full = await item.future
        finally:
            self._pending -= 1
        idx = [self._names.index(n) for n in names]
        return {self._names[i]: full[i] for i in idx}

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        max_rows = self._cfg.max_batch_size
        delay = self._cfg.max_queue_delay_us / 1e6
        assert self._wakeup is not None
        while self._queue:
            first = self._queue.popleft()
            batch = [first]
            rows = first.rows
            deadline = loop.time() + delay
            while rows < max_rows:
                if self._queue:
                    nxt = self._queue[0]
                    if nxt.key != first.key or rows + nxt.rows > max_rows:
                        break
                    batch.append(self._queue.popleft())
                    rows += nxt.rows
                    continue
                # Nothing else queued. Under light load (last batch was a single
                # request) waiting only adds latency; under load it fills the batch.
                remaining = deadline - loop.time()
                if self._last_batch <= 1 or remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            self._last_batch = len(batch)
            await self._run(batch, rows, loop)

    async def _run(self, batch: list[_Item], rows: int, loop: asyncio.AbstractEventLoop) -> None:
        now = time.perf_counter()
        for it in batch:
            self._m_queue.observe(now - it.enqueued)
        self._m_batch.observe(len(batch))
        try:
            if len(batch) == 1:
                feed = _to_ort(batch[0].inputs)
            else:
                feed = _to_ort(
                    {n: np.concatenate([it.inputs[n] for it in batch]) for n in batch[0].inputs}
                )
            results = await loop.run_in_executor(self._executor, self._model.run, feed, ())
        except Exception as exc:
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        if len(batch) == 1:
            batch[0].future.set_result(results)
            return
        if any(r.shape[:1] != (rows,) for r in results):
            err = RuntimeError(
                f"model {self._model.info.name}: outputs do not keep the batch dimension"
            )
            for it in batch:
                it.future.set_exception(err)
            return
        start = 0
        for it in batch:
            end = start + it.rows
            if not it.future.done():
                it.future.set_result([r[start:end] for r in results])
            start = end
