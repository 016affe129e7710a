"""Dynamic batching gives exactly the unbatched results, and its queue is bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from sealserve.client import AsyncClient
from sealserve.errors import OverloadedError
from sealserve.server.batcher import Batcher
from sealserve.server.metrics import Metrics
from sealserve.server.repository import BatchingConfig


def test_32_concurrent_clients_equal_unbatched(start_server: Any, repo: Path) -> None:
    running = start_server(model_repository=repo, unsafe_plaintext=True)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(32 * 4)]
    sess = ort.InferenceSession(str(repo / "matmul" / "2" / "model.onnx"))
    expected = [sess.run(None, {"x": x})[0] for x in xs]

    async def go() -> list[dict[str, np.ndarray]]:
        clients = [AsyncClient(running.target, unsafe_plaintext=True) for _ in range(32)]
        try:

            async def worker(c: AsyncClient, idx: list[int]) -> list[tuple[int, Any]]:
                return [(i, await c.infer("matmul", {"x": xs[i]}, version="2")) for i in idx]

            parts = await asyncio.gather(
                *(worker(c, list(range(k, len(xs), 32))) for k, c in enumerate(clients))
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        out: list[Any] = [None] * len(xs)
        for part in parts:
            for i, r in part:
                out[i] = r
        return out

    results = asyncio.run(go())
    for i, r in enumerate(results):
        assert r["y"].shape == expected[i].shape
        assert np.array_equal(r["y"], expected[i]), f"request {i} differs from unbatched"
    # Batching really happened: some runs held more than one request.
    registry = running.server.metrics.registry
    labels = {"model": "matmul", "version": "2"}
    count = registry.get_sample_value("sealserve_batch_size_count", labels)
    total = registry.get_sample_value("sealserve_batch_size_sum", labels)
    assert total == len(xs)
    assert count < len(xs), "every request ran alone: no batching happened"


class _SlowModel:
    """Stands in for LoadedModel: a run that takes a while, so the queue fills."""

    def __init__(self) -> None:
        from sealserve.server.types import ModelInfo, TensorSpec

        spec = TensorSpec("x", "FP32", (-1, 2))
        self.info = ModelInfo(
            "slow", "1", ("1",), "test", (spec,), (TensorSpec("y", "FP32", (-1, 2)),), True
        )
        self.output_names = ["y"]
        self.runs: list[int] = []

    def run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ()) -> list[np.ndarray]:
        self.runs.append(inputs["x"].shape[0])
        time.sleep(0.05)
        return [inputs["x"] * 2]

    def warmup_us(self) -> float:
        return 50_000.0


@pytest.mark.parametrize("max_batch", [0, 8])
async def test_queue_is_bounded(max_batch: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = _SlowModel()
    cfg = BatchingConfig(max_batch_size=max_batch, max_queue_size=3, execution="thread")
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(model, cfg, pool, Metrics())  # type: ignore[arg-type]
        x = np.ones((1, 2), np.float32)
        results = await asyncio.gather(
            *(batcher.infer({"x": x * i}, ()) for i in range(10)), return_exceptions=True
        )
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert len(ok) == 3 and len(refused) == 7
    assert "queue is full (3 requests waiting)" in refused[0].message
    for i, r in enumerate(results[:3]):
        assert isinstance(r, dict)
        np.testing.assert_array_equal(r["y"], x * i * 2)
