"""onnxruntime sessions and the engine that routes requests to them.

One :class:`LoadedModel` per model version. Requests reach it through a
:class:`~sealserve.server.batcher.Batcher`, which either runs them inline or
coalesces concurrent requests into one ``run``.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from sealserve.enclave.manifest import ModelMeasurement
from sealserve.errors import ConfigError, NotFoundError, quote
from sealserve.server.batcher import Batcher
from sealserve.server.metrics import Metrics
from sealserve.server.model_keys import KeyProvider
from sealserve.server.repository import FileModelSource, ModelEntry
from sealserve.server.types import InferRequest, InferResponse, ModelInfo, TensorSpec
from sealserve.tensors import ORT_TO_OIP

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("sealserve.engine")


def _specs(args: Iterable[ort.NodeArg]) -> tuple[TensorSpec, ...]:
    specs = []
    for a in args:
        datatype = ORT_TO_OIP.get(a.type)
        if datatype is None:
            raise ConfigError(f"tensor '{a.name}' has type {a.type}, which OIP cannot carry")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (a.shape or []))
        specs.append(TensorSpec(name=a.name, datatype=datatype, shape=shape))
    return tuple(specs)


class LoadedModel:
    """An onnxruntime session for one model version, with its OIP metadata."""

    def __init__(
        self,
        entry: ModelEntry,
        model_bytes: bytes,
        *,
        versions: tuple[str, ...],
        threads: int,
        sha256: str,
    ) -> None:
        # Imported here, not with the module: onnxruntime starts threads when imported,
        # and a server with workers forks before any exists (server/workers.py).
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = entry.config.intra_op_threads or threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn CPU between requests; a server shares its cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                model_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConfigError(
                f"model {entry.name} version {entry.version} ({entry.source.describe()}) "
                "is not a loadable ONNX model"
            ) from exc
        inputs = _specs(self.session.get_inputs())
        outputs = _specs(self.session.get_outputs())
        batchable = all(s.shape and s.shape[0] == -1 for s in (*inputs, *outputs))
        self.info = ModelInfo(
            name=entry.name,
            version=entry.version,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=inputs,
            outputs=outputs,
            batchable=batchable,
        )
        self.entry = entry
        self.output_names = [s.name for s in outputs]
        self.sha256 = sha256
        # The session's native run, without the Python wrapper's per-call checks (a
        # missing input, OrtValue ownership, GPU graph capture): the callers pass every
        # input as a validated numpy array on the CPU provider. The wrapper's run where
        # the native one is not where this onnxruntime keeps it.
        native = getattr(self.session, "_sess", None)
        self._native_run = getattr(native, "run", None)

    def run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ()) -> list[np.ndarray]:
        """Run the session on onnxruntime-ready inputs (BYTES as str arrays); returns
        the requested outputs (all when ``outputs`` is empty)."""
        names = outputs or self.output_names
        if self._native_run is not None:
            return self._native_run(names, inputs, None)  # type: ignore[no-any-return]
        return self.session.run(list(names), inputs)  # type: ignore[no-any-return]

    def warmup_us(self, runs: int = 5) -> float | None:
        """Median microseconds of a batch-1 run on zero inputs, or None if that fails."""
        feed: dict[str, np.ndarray] = {}
        for s in self.info.inputs:
            shape = tuple(1 if d < 0 else d for d in s.shape)
            if s.datatype == "BYTES":
                arr = np.full(shape, "", dtype=np.str_)
            else:
                arr = np.zeros(shape, dtype=s.dtype)
            feed[s.name] = arr
        times = []
        try:
            for _ in range(runs):
                t0 = time.perf_counter()
                self.run(feed)
                times.append((time.perf_counter() - t0) * 1e6)
        except Exception:  # a model may reject zeros; then we simply do not know
            log.debug("warm-up of %s failed", self.info.name, exc_info=True)
            return None
        return statistics.median(times)


class Engine:
    """All loaded model versions, each behind its batcher."""

    def __init__(self, metrics: Metrics, *, threads: int = 1) -> None:
        self._metrics = metrics
        self._threads = threads
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._latest: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sealserve-ort")

    def load(
        self,
        entries: list[ModelEntry],
        measured: Sequence[ModelMeasurement] | None = None,
        keys: KeyProvider | None = None,
    ) -> None:
        """Load every entry (reading bytes through its source; encrypted ones with their
        key from ``keys``, key files only when None).

        ``measured``: the digests the workload manifest announced; a plaintext model
        whose bytes changed since is refused (encrypted models are checked by
        decryption against their header). Raises ConfigError, SealedFormatError,
        KeyReleaseError.
        """
        expected = {(m.name, m.version): m.sha256 for m in measured or ()}
        keys = keys if keys is not None else KeyProvider()
        by_model: dict[str, list[str]] = {}
        for e in entries:
            by_model.setdefault(e.name, []).append(e.version)
        for e in entries:
            versions = tuple(sorted(by_model[e.name], key=int))
            data = e.source.read(keys)
            digest = expected.get((e.name, e.version))
            if digest is None or isinstance(e.source, FileModelSource):
                actual = hashlib.sha256(data).hexdigest()
                if digest is not None and actual != digest:
                    raise ConfigError(
                        f"model {e.name} version {e.version} changed on disk after it was "
                        "measured; restart to serve the new bytes"
                    )
                digest = actual
            model = LoadedModel(e, data, versions=versions, threads=self._threads, sha256=digest)
            del data
            key = (e.name, e.version)
            self._models[key] = model
            self._batchers[key] = Batcher(model, e.config.batching, self._executor, self._metrics)
            latest = self._latest.get(e.name)
            if latest is None or int(e.version) > int(latest):
                self._latest[e.name] = e.version
            log.info(
                "loaded model %s version %s (%s, batching: %s)",
                e.name,
                e.version,
                e.source.describe(),
                self._batchers[key].describe(),
            )
        self._metrics.models_ready.set(len(self._models))

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The model version to use; the latest loaded when ``version`` is empty."""
        v = version or self._latest.get(name, "")
        model = self._models.get((name, v))
        if model is None:
            if name not in self._latest:
                raise NotFoundError(f"model {quote(name)} is not served")
            raise NotFoundError(
                f"model {quote(name)} has no version {quote(version)} "
                f"(served: {', '.join(self._models[(name, self._latest[name])].info.versions)})"
            )
        return model

    def ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except NotFoundError:
            return False
        return True

    @property
    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def infer_inline(self, request: InferRequest) -> InferResponse | None:
        """Run ``request`` now, on the caller's thread, when its model runs inline;
        None when it goes through a queue or a worker thread (await :meth:`infer`)."""
        batcher = self._batchers[(request.model, request.version)]
        if not batcher.inline:
            return None
        outputs = batcher.run_inline(request.inputs, request.outputs)
        return InferResponse(
            model=request.model, version=request.version, outputs=outputs, id=request.id
        )

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run ``request`` (already validated against the model's metadata)."""
        response = self.infer_inline(request)
        if response is not None:
            return response
        batcher = self._batchers[(request.model, request.version)]
        outputs = await batcher.infer(request.inputs, request.outputs)
        return InferResponse(
            model=request.model, version=request.version, outputs=outputs, id=request.id
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
