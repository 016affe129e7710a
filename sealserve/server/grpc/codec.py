"""OIP protobuf <-> numpy, with validation against the model's metadata.

Protobuf stops here: the servicer decodes with these functions, hands numpy arrays to
the transport-free core, and encodes the result. Every problem with a client's tensors
is a :class:`TensorError` naming the tensor and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sealserve._proto import grpc_service_pb2 as pb
from sealserve.errors import TensorError, quote, quote_shape
from sealserve.server.types import InferRequest, InferResponse, ModelInfo, TensorSpec
from sealserve.tensors import (
    CONTENTS_FIELD,
    NUMPY_TO_OIP,
    OIP_TO_NUMPY,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_to_oip,
)


def _datatype(datatype: str) -> str:
    if datatype in OIP_TO_NUMPY:
        return datatype
    return quote(datatype) if datatype else "(empty)"


def _check_shape(name: str, spec: TensorSpec, shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) != len(spec.shape):
        raise TensorError(
            f"input '{name}': expected rank {len(spec.shape)} with shape "
            f"{list(spec.shape)}, got shape {quote_shape(shape)}"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if got < 0:
            raise TensorError(f"input '{name}': negative dimension in shape {quote_shape(shape)}")
        if want >= 0 and got != want:
            raise TensorError(
                f"input '{name}': expected shape {list(spec.shape)}, got {quote_shape(shape)}"
            )
    return tuple(shape)


def _decode_typed(name: str, datatype: str, contents: Any, count: int) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"input '{name}': datatype {datatype} must be sent as raw contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            f"input '{name}': shape needs {count} elements, typed contents hold {len(values)}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values)
        return arr
    for other in CONTENTS_FIELD.values():
        if other != field and len(getattr(contents, other)):
            raise TensorError(
                f"input '{name}': datatype {datatype} expects '{field}', found '{other}'"
            )
    try:
        return np.array(values, dtype=OIP_TO_NUMPY[datatype])
    except (OverflowError, ValueError) as exc:
        raise TensorError(f"input '{name}': values out of range for {datatype}") from exc


def declared_batch(req: pb.ModelInferRequest) -> int:
    """The batch size the first input's shape declares (1 for a scalar input, 0 or
    less when it declares none), read without touching any tensor contents."""
    if not req.inputs:
        return 0
    shape = req.inputs[0].shape
    return int(shape[0]) if len(shape) else 1


def decode_infer_request(
    req: pb.ModelInferRequest, info: ModelInfo, *, max_bytes: int
) -> InferRequest:
    """Turn a ModelInferRequest into numpy inputs checked against ``info``.

    Raises :class:`TensorError` for missing, extra or duplicate inputs, a wrong
    datatype, rank or dimension, raw contents whose length does not match the shape,
    raw and typed contents mixed, unknown requested outputs, or tensors whose total
    size exceeds ``max_bytes``.
    """
    specs = info.input_map
    raw = req.raw_input_contents
    use_raw = len(raw) > 0
    if use_raw and len(raw) != len(req.inputs):
        raise TensorError(
            f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs; "
            "send one raw entry per input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    total = 0
    for idx, tensor in enumerate(req.inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise TensorError(
                f"input {quote(name)} is not an input of model '{info.name}' "
                f"(inputs: {', '.join(sorted(specs))})"
            )
        if name in inputs:
            raise TensorError(f"input '{name}' appears more than once")
        if tensor.datatype != spec.datatype:
            raise TensorError(
                f"input '{name}': expected datatype {spec.datatype}, "
                f"got {_datatype(tensor.datatype)}"
            )
        shape = _check_shape(name, spec, tensor.shape)
        count = math.prod(shape)
        itemsize = 0 if spec.datatype == "BYTES" else OIP_TO_NUMPY[spec.datatype].itemsize
        if use_raw:
            if tensor.HasField("contents"):
                raise TensorError(
                    f"input '{name}': both raw_input_contents and typed contents are set; use one"
                )
            size = len(raw[idx])
        else:
            if not tensor.HasField("contents"):
                raise TensorError(f"input '{name}': no contents (neither raw nor typed)")
            if itemsize:
                size = count * itemsize
            else:
                size = sum(len(b) for b in tensor.contents.bytes_contents)
        total += size
        if total > max_bytes:
            raise TensorError(
                f"input '{name}': request tensors exceed the size limit of {max_bytes} bytes"
            )
        if use_raw:
            data = raw[idx]
            if spec.datatype == "BYTES":
                arr = decode_bytes_tensor(name, data, count)
            else:
                if len(data) != count * itemsize:
                    raise TensorError(
                        f"input '{name}': shape {list(shape)} of {spec.datatype} needs "
                        f"{count * itemsize} bytes, raw contents hold {len(data)}"
                    )
                arr = np.frombuffer(data, dtype=OIP_TO_NUMPY[spec.datatype])
        else:
            arr = _decode_typed(name, spec.datatype, tensor.contents, count)
        inputs[name] = arr.reshape(shape)
    if len(inputs) != len(specs):
        missing = [s.name for s in info.inputs if s.name not in inputs]
        raise TensorError(f"missing input(s): {', '.join(missing)}")
    return InferRequest(
        model=info.name, version=info.version, inputs=inputs,
        outputs=requested_outputs(req, info), id=req.id,
    )  # fmt: skip


def requested_outputs(req: pb.ModelInferRequest, info: ModelInfo) -> tuple[str, ...]:
    """The output names ``req`` asks for (empty: all), read without decoding its
    tensors. Raises :class:`TensorError` for a name that is not an output of the model."""
    outputs = tuple(o.name for o in req.outputs)
    known = info.output_names
    for out in outputs:
        if out not in known:
            raise TensorError(
                f"requested output {quote(out)} is not an output of model '{info.name}' "
                f"(outputs: {', '.join(sorted(known))})"
            )
    return outputs


def encode_infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """Encode outputs as raw contents (what Triton does; every OIP client reads it)."""
    out = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    raws = out.raw_output_contents
    for name, arr in resp.outputs.items():
        datatype = NUMPY_TO_OIP.get(arr.dtype) or numpy_to_oip(arr.dtype)
        out.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            raws.append(encode_bytes_tensor(arr))
        else:
            raws.append(arr.tobytes())  # tobytes() is C-order whatever the layout
    for key, value in resp.parameters.items():
        param = out.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    return out


def encode_model_metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=info.name,
        versions=list(info.versions),
        platform=info.platform,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in info.inputs
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in info.outputs
        ],
    )
