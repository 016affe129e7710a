"""OIP REST JSON (and the binary tensor data extension) <-> numpy, checked against the
model's metadata.

JSON stops here: the REST adapter decodes with these functions, hands numpy arrays to
the transport-free core, and encodes the result. The checks and their limits are the
gRPC codec's (datatype, rank, dimensions, element counts, the total tensor size), so
a request is refused the same way whichever protocol carried it. Every problem is a
:class:`TensorError` (HTTP 400) naming the tensor and what is wrong, quoting client
strings short.

Binary tensor data extension (what ``tritonclient.http`` sends): the body is a JSON
header of ``Inference-Header-Content-Length`` bytes followed by each binary input's
bytes, in input order; an input says it is binary with ``parameters.binary_data_size``.
Outputs come back binary when the request asks (``parameters.binary_data_output`` or
an output's ``parameters.binary_data``), the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from sealserve.errors import TensorError
from sealserve.server.types import InferRequest, InferResponse, ModelInfo, TensorSpec
from sealserve.tensors import (
    NUMPY_TO_OIP,
    OIP_TO_NUMPY,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_to_oip,
)

# numpy kinds a JSON array may parse to, per datatype: JSON numbers become ints or
# floats, true/false bools, strings unicode. Anything else is the wrong datatype.
_KINDS: dict[str, str] = {"BOOL": "b", "BYTES": "U", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_INT_KINDS = "iu"


def quote(text: str, limit: int = 32) -> str:
    """A client string for an error message: a short prefix and its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


@dataclass(slots=True)
class DecodedRequest:
    request: InferRequest
    binary_outputs: frozenset[str]
    all_binary: bool


def _label(what: str, of: tuple[str, str] | None) -> str:
    # Built only on error: quoting a name on every request costs more than the check.
    return what if of is None else f"{of[0]} {quote(of[1])}: {what}"


def _object(value: Any, what: str, of: tuple[str, str] | None = None) -> dict[str, Any]:
    """``value`` if it is a JSON object; ``what`` (of ``(kind, name)``) names it."""
    if type(value) is not dict:
        raise TensorError(f"{_label(what, of)} must be a JSON object, got {type(value).__name__}")
    return value


def _str(value: Any, what: str, of: tuple[str, str] | None = None) -> str:
    if type(value) is not str:
        raise TensorError(f"{_label(what, of)} must be a string, got {type(value).__name__}")
    return value


def _shape(name: str, spec: TensorSpec, value: Any) -> int:
    """The element count of a valid ``shape`` for ``spec``; TensorError otherwise."""
    want_shape = spec.shape
    # One loop for the common (valid) shape; the loops below word what is wrong.
    if type(value) is list and len(value) == len(want_shape):
        count = 1
        for got, want in zip(value, want_shape, strict=True):
            if type(got) is not int or got < 0 or (want >= 0 and got != want):
                break
            count *= got
        else:
            return count
    if type(value) is not list:
        raise TensorError(f"input {quote(name)}: shape must be a list of integers")
    for d in value:
        if type(d) is not int:
            raise TensorError(f"input {quote(name)}: shape must be a list of integers")
    if len(value) != len(want_shape):
        raise TensorError(
            f"input {quote(name)}: expected rank {len(want_shape)} with shape "
            f"{list(want_shape)}, got rank {len(value)}"
        )
    if any(got < 0 for got in value):
        raise TensorError(f"input {quote(name)}: negative dimension in shape")
    raise TensorError(f"input {quote(name)}: expected shape {list(want_shape)}, got {value}")


def _from_json(name: str, datatype: str, data: Any, count: int) -> np.ndarray:
    """A JSON ``data`` array (flat or nested, row-major) as an array of ``datatype``
    holding ``count`` elements (flat for BYTES; the caller reshapes)."""
    if not isinstance(data, list):
        raise TensorError(f"input {quote(name)}: data must be a JSON array")
    if not data:
        if count:
            raise TensorError(f"input {quote(name)}: shape needs {count} elements, data holds 0")
        return np.empty(0, dtype=OIP_TO_NUMPY[datatype])
    try:
        parsed = np.array(data)
    except (ValueError, OverflowError) as exc:
        raise TensorError(
            f"input {quote(name)}: data is not a regular array of {datatype} values"
        ) from exc
    allowed, target, bounds = _JSON_DECODE[datatype]
    if parsed.dtype.kind not in allowed:
        raise TensorError(
            f"input {quote(name)}: data holds {_describe(parsed.dtype)} values, "
            f"datatype {datatype} needs {_describe_kinds(allowed)}"
        )
    if parsed.size != count:
        raise TensorError(
            f"input {quote(name)}: shape needs {count} elements, data holds {parsed.size}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = [s.encode() for s in parsed.reshape(-1).tolist()]
        return out
    if bounds is not None and (parsed.min() < bounds[0] or parsed.max() > bounds[1]):
        raise TensorError(f"input {quote(name)}: values out of range for {datatype}")
    return parsed.astype(target, copy=False)


def _int_range(dtype: np.dtype[Any]) -> tuple[int, int] | None:
    info = np.iinfo(dtype) if dtype.kind in _INT_KINDS else None  # type: ignore[type-var]
    return None if info is None else (int(info.min), int(info.max))


# Per datatype: the numpy kinds its JSON may parse to, the element type, an int's range.
_JSON_DECODE: dict[str, tuple[str, np.dtype[Any], tuple[int, int] | None]] = {
    oip: (_KINDS.get(oip, _INT_KINDS), dtype, _int_range(dtype))
    for oip, dtype in OIP_TO_NUMPY.items()
}


def _describe(dtype: np.dtype[Any]) -> str:
    kinds = {"b": "boolean", "i": "integer", "u": "integer", "f": "number", "U": "string"}
    return kinds.get(dtype.kind, "mixed or null")


def _describe_kinds(kinds: str) -> str:
    return {"b": "booleans", "U": "strings", "iuf": "numbers"}.get(kinds, "integers")


def decode_infer_request(
    body: bytes,
    info: ModelInfo,
    *,
    header_length: int | None,
    max_bytes: int,
    max_json_bytes: int,
) -> DecodedRequest:
    """Decode a REST inference request for ``info``.

    ``header_length``: the ``Inference-Header-Content-Length`` header (None: the whole
    body is JSON). Raises :class:`TensorError` for malformed JSON, missing, extra or
    duplicate inputs, a wrong datatype, rank or dimension, data whose element count
    does not match the shape, binary sizes that disagree with the body, unknown
    requested outputs, or tensors whose total size exceeds ``max_bytes``.
    """
    binary: memoryview | bytes = b""
    if header_length is None:
        header = body
    else:
        if header_length > len(body):
            raise TensorError(
                f"Inference-Header-Content-Length is {header_length} but the body holds "
                f"{len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    if len(header) > max_json_bytes:
        raise TensorError(
            f"the JSON part of the request is {len(header)} bytes, over the limit of "
            f"{max_json_bytes}; send large tensors with the binary data extension"
        )
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise TensorError(f"request body is not valid JSON ({exc})") from exc
    doc = _object(doc, "the request body")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError("'inputs' must be a non-empty JSON array")
    specs = info.input_map
    inputs: dict[str, np.ndarray] = {}
    total = 0
    offset = 0
    for item in raw_inputs:
        # The common case is checked inline; the helpers word the errors.
        tensor = item if type(item) is dict else _object(item, "each entry of 'inputs'")
        name = tensor.get("name")
        if type(name) is not str:
            name = _str(name, "an input's 'name'")
        spec = specs.get(name)
        if spec is None:
            raise TensorError(
                f"input {quote(name)} is not an input of model '{info.name}' "
                f"(inputs: {', '.join(sorted(specs))})"
            )
        if name in inputs:
            raise TensorError(f"input {quote(name)} appears more than once")
        datatype = tensor.get("datatype")
        if datatype != spec.datatype:
            datatype = _str(datatype, "'datatype'", ("input", name))
            raise TensorError(
                f"input {quote(name)}: expected datatype {spec.datatype}, "
                f"got {quote(datatype) if datatype else '(empty)'}"
            )
        shape: Any = tensor.get("shape")  # a list of ints once _shape passes it
        count = _shape(name, spec, shape)
        itemsize = 0 if datatype == "BYTES" else OIP_TO_NUMPY[datatype].itemsize
        params = tensor.get("parameters")
        # Absent, null or empty: no parameters (a falsy value is read as {}).
        size = (
            _object(params, "'parameters'", ("input", name)).get("binary_data_size")
            if params
            else None
        )
        if size is not None:
            if "data" in tensor:
                raise TensorError(
                    f"input {quote(name)}: both binary_data_size and data are set; use one"
                )
            if header_length is None:
                raise TensorError(
                    f"input {quote(name)}: binary_data_size needs the "
                    "Inference-Header-Content-Length header"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorError(
                    f"input {quote(name)}: binary_data_size must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise TensorError(
                    f"input {quote(name)}: binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data in the body"
                )
            total += size
        else:
            if "data" not in tensor:
                raise TensorError(f"input {quote(name)}: no data (neither data nor binary)")
            total += count * itemsize  # BYTES: counted once decoded, below
        if total > max_bytes:
            raise TensorError(
                f"input {quote(name)}: request tensors exceed the size limit of {max_bytes} bytes"
            )
        if size is not None:
            view = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                arr = decode_bytes_tensor(name, bytes(view), count)
            else:
                if size != count * itemsize:
                    raise TensorError(
                        f"input {quote(name)}: shape {list(shape)} of {datatype} needs "
                        f"{count * itemsize} bytes, binary data holds {size}"
                    )
                # A read-only view of the body, not a copy (as bytes would give).
                arr = np.frombuffer(view, dtype=OIP_TO_NUMPY[datatype])
        else:
            arr = _from_json(name, datatype, tensor["data"], count)
            if datatype == "BYTES":
                total += sum(len(b) for b in arr.tolist())
                if total > max_bytes:
                    raise TensorError(
                        f"input {quote(name)}: request tensors exceed the size limit of "
                        f"{max_bytes} bytes"
                    )
        inputs[name] = arr.reshape(shape)
    if offset != len(binary):
        raise TensorError(
            f"the body holds {len(binary)} bytes of binary data after the JSON header, "
            f"the inputs' binary_data_size add up to {offset}"
        )
    if len(inputs) != len(specs):
        missing = [s.name for s in info.inputs if s.name not in inputs]
        raise TensorError(f"missing input(s): {', '.join(missing)}")
    # The common request names no outputs, no parameters and maybe an id: checked inline.
    requested = doc.get("outputs")
    outputs, binary_outputs = (
        ((), _NO_NAMES) if requested is None else _requested_outputs(requested, info)
    )
    params = doc.get("parameters")
    if params is not None and type(params) is not dict:
        params = _object(params or {}, "the request's 'parameters'")
    request_id = doc.get("id", "")
    if type(request_id) is not str:
        request_id = _str(request_id, "'id'")
    return DecodedRequest(
        InferRequest(
            model=info.name, version=info.version, inputs=inputs, outputs=outputs, id=request_id
        ),
        binary_outputs=binary_outputs,
        all_binary=params is not None and params.get("binary_data_output") is True,
    )


_NO_NAMES: frozenset[str] = frozenset()


def _requested_outputs(value: Any, info: ModelInfo) -> tuple[tuple[str, ...], frozenset[str]]:
    if not isinstance(value, list):
        raise TensorError("'outputs' must be a JSON array")
    names: list[str] = []
    binary: set[str] = set()
    for item in value:
        out = _object(item, "each entry of 'outputs'")
        name = _str(out.get("name"), "an output's 'name'")
        if name not in info.output_names:
            raise TensorError(
                f"requested output {quote(name)} is not an output of model '{info.name}' "
                f"(outputs: {', '.join(sorted(info.output_names))})"
            )
        params = _object(out.get("parameters") or {}, "'parameters'", ("output", name))
        if params.get("binary_data") is True:
            binary.add(name)
        names.append(name)
    return tuple(names), frozenset(binary)


def _json_data(arr: np.ndarray) -> Any:
    flat = arr.reshape(-1)
    if arr.dtype.kind in ("O", "U", "S"):
        return [
            x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat.tolist()
        ]
    if arr.dtype == np.float16:
        return flat.astype(np.float32)  # orjson has no float16
    return np.ascontiguousarray(flat)


# Element types orjson writes straight from a contiguous array (``ravel`` makes one).
_JSON_NATIVE: dict[np.dtype[Any], str] = {
    dtype: oip
    for dtype, oip in NUMPY_TO_OIP.items()
    if dtype.kind in "biuf" and dtype != np.float16  # orjson has no float16
}


def encode_infer_response(
    resp: InferResponse, *, binary_outputs: frozenset[str] = frozenset(), all_binary: bool = False
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is JSON only)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in resp.outputs.items():
        # The common output (numbers or booleans, as JSON) in one lookup.
        datatype = _JSON_NATIVE.get(arr.dtype)
        if datatype is not None and not all_binary and name not in binary_outputs:
            outputs.append(
                {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": arr.ravel()}
            )
            continue
        datatype = NUMPY_TO_OIP.get(arr.dtype) or numpy_to_oip(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if all_binary or name in binary_outputs:
            blob = encode_bytes_tensor(arr) if datatype == "BYTES" else arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(arr)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)


def model_metadata(info: ModelInfo) -> bytes:
    def specs(items: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in items]

    return orjson.dumps(
        {
            "name": info.name,
            "versions": list(info.versions),
            "platform": info.platform,
            "inputs": specs(info.inputs),
            "outputs": specs(info.outputs),
        }
    )
