"""Suspect adapters for watermark verification and the replica check."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sealserve.errors import InputError

__all__ = ["OnnxSuspect"]


class OnnxSuspect:
    """A suspect model in an ONNX file, called like ``predict(inputs) -> outputs``.

    Returns the first output that is a 2-D float tensor (class probabilities or
    scores; a scikit-learn ZipMap list of dicts is turned into an array), else the
    first output (labels).

    Raises:
        InputError: the file is missing or is not a loadable ONNX model (at construction),
            or the model fails on the inputs (at call).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(
                os.fspath(path), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise InputError(f"cannot load suspect model {os.fspath(path)!r}: {exc}") from exc
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._dtype = np.float64 if "double" in inp.type else np.float32

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=self._dtype)
        try:
            outs: list[Any] = self._session.run(None, {self._input: x})
        except Exception as exc:
            raise InputError(f"the suspect model failed on the probe inputs: {exc}") from exc
        for o in outs:
            if isinstance(o, list) and o and isinstance(o[0], dict):
                keys = sorted(o[0])
                return np.array([[row[k] for k in keys] for row in o], dtype=np.float64)
            a = np.asarray(o)
            if a.ndim == 2 and a.dtype.kind == "f" and a.shape[1] > 1:
                return a
        return np.asarray(outs[0])
