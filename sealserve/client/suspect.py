"""A suspect model behind any OIP endpoint, called like ``predict(inputs) -> outputs``
(for watermark verification and replica checks against someone else's server)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sealserve.client.client import Client
from sealserve.errors import InputError, SealserveError


class EndpointSuspect:
    """Sends inputs in batches to ``model`` on an OIP endpoint; returns the first 2-D
    float output (probabilities), else the first output (labels).

    Raises InputError naming the endpoint when it errors or times out.
    """

    def __init__(self, client: Client, model: str, *, batch: int = 64) -> None:
        self._client = client
        self._model = model
        self._batch = batch
        meta = client.model_metadata(model)
        if len(meta.inputs) != 1:
            raise InputError(f"suspect model {model!r} must have exactly one input")
        self._input = meta.inputs[0].name
        self._dtype = {"FP32": np.float32, "FP64": np.float64}.get(meta.inputs[0].datatype)
        if self._dtype is None:
            raise InputError(f"suspect input datatype {meta.inputs[0].datatype} is not float")

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        parts: list[np.ndarray] = []
        for start in range(0, len(inputs), self._batch):
            chunk = np.asarray(inputs[start : start + self._batch], dtype=self._dtype)
            try:
                out = self._client.infer(self._model, {self._input: chunk})
            except SealserveError as exc:
                raise InputError(f"suspect endpoint failed: {exc.message}") from exc
            parts.append(_pick(out))
        return np.concatenate(parts)


def _pick(outputs: dict[str, Any]) -> np.ndarray:
    for value in outputs.values():
        if value.ndim == 2 and value.dtype.kind == "f":
            return np.asarray(value)
    return np.asarray(next(iter(outputs.values())))
