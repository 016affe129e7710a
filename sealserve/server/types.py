"""Transport-free data-plane types: what the servicer hands to the core and back."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the OIP metadata describes it (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[np.generic]:
        from sealserve.tensors import OIP_TO_NUMPY

        return OIP_TO_NUMPY[self.datatype]


@dataclass(frozen=True)
class ModelInfo:
    """What ModelMetadata reports for one model version."""

    name: str
    version: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batchable: bool = False

    @cached_property
    def input_map(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.inputs}

    @cached_property
    def output_names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.outputs)


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] = ()
    id: str = ""


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str = ""
    parameters: dict[str, str | int | float | bool] = field(default_factory=dict)
