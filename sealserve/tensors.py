"""OIP (KServe V2) tensor datatypes, their numpy / onnxruntime equivalents, and the
BYTES wire encoding. Shared by the server and the client SDK (numpy only)."""

from __future__ import annotations

import struct

import numpy as np

from sealserve.errors import TensorError

_LEN = struct.Struct("<I")

# OIP datatype -> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
OIP_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_OIP: dict[np.dtype[np.generic], str] = {v: k for k, v in OIP_TO_NUMPY.items()}

# onnxruntime's type strings for the tensor element types above.
ORT_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Which InferTensorContents field carries each datatype in typed (non-raw) form.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
    # FP16 has no typed field in the OIP spec: raw contents only.
}


def numpy_to_oip(dtype: np.dtype[np.generic]) -> str:
    """The OIP datatype for a numpy dtype (str/bytes/object arrays are BYTES)."""
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    return NUMPY_TO_OIP[np.dtype(dtype)]


def decode_bytes_tensor(name: str, raw: bytes, count: int) -> np.ndarray:
    """Decode BYTES raw contents: each element is a 4-byte little-endian length + data."""
    if count * 4 > len(raw):
        raise TensorError(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes, "
            f"raw contents hold {len(raw)}"
        )
    out = np.empty(count, dtype=np.object_)
    view = memoryview(raw)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise TensorError(f"input '{name}': BYTES raw contents end inside element {i}")
        (size,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + size > len(view):
            raise TensorError(f"input '{name}': BYTES element {i} runs past the raw contents")
        out[i] = bytes(view[pos : pos + size])
        pos += size
    if pos != len(view):
        raise TensorError(
            f"input '{name}': {len(view) - pos} trailing bytes after {count} BYTES elements"
        )
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
