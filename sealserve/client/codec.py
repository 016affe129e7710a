"""numpy <-> OIP protobuf for the client side (raw contents, like tritonclient)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sealserve._proto import grpc_service_pb2 as pb
from sealserve.errors import TensorError
from sealserve.tensors import (
    OIP_TO_NUMPY,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_to_oip,
)


def encode_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    outputs: Sequence[str] = (),
    request_id: str = "",
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        arr = np.asarray(value)
        datatype = numpy_to_oip(arr.dtype)
        req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        if datatype == "BYTES":
            req.raw_input_contents.append(encode_bytes_tensor(arr))
        else:
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    for out in outputs:
        req.outputs.add(name=out)
    return req


def decode_response(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode a response's outputs (raw or typed contents) to numpy arrays."""
    result: dict[str, np.ndarray] = {}
    raws = resp.raw_output_contents
    for i, out in enumerate(resp.outputs):
        shape = tuple(out.shape)
        dtype = OIP_TO_NUMPY.get(out.datatype)
        if dtype is None:
            raise TensorError(f"output '{out.name}': unknown datatype {out.datatype}")
        if i < len(raws):
            if out.datatype == "BYTES":
                arr = decode_bytes_tensor(out.name, raws[i], math.prod(shape))
            else:
                arr = np.frombuffer(raws[i], dtype=dtype)
        else:
            from sealserve.tensors import CONTENTS_FIELD

            field = CONTENTS_FIELD.get(out.datatype, "")
            arr = np.array(list(getattr(out.contents, field, [])), dtype=dtype)
        result[out.name] = arr.reshape(shape)
    return result
