"""Per-account detector state: where it lives and how it is written.

Detectors keep small, bounded state per (account, model). Several replicas must see
the same state, so it lives in a shared store behind :class:`BlobStore`: two methods,
``get_blob`` and ``put_blob``. The quota layer's ``StateStore`` provides exactly these
two methods; :class:`MemoryBlobStore` is the in-process implementation for tests and
single-process use.

State is written as one compact binary blob per key::

    magic b"SSDS" | version 0x01 | kind (1 byte) | n_arrays (1 byte)
    then per array: dtype code (1 byte) | ndim (1 byte) | shape (uint32 LE each) | data

Only numeric dtypes are allowed (no pickle), so a blob from the store cannot run code.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from sealserve.errors import UnavailableError

MAGIC = b"SSDS"
VERSION = 1

_DTYPES: dict[int, np.dtype[np.generic]] = {
    1: np.dtype("<f2"),
    2: np.dtype("<f4"),
    3: np.dtype("<f8"),
    4: np.dtype("<i8"),
    5: np.dtype("<u1"),
    6: np.dtype("<u2"),
    7: np.dtype("<i4"),
}
_CODES: dict[np.dtype[np.generic], int] = {v: k for k, v in _DTYPES.items()}


@runtime_checkable
class BlobStore(Protocol):
    """The two state-store methods detectors need (the quota ``StateStore`` has them).

    ``get_blob`` returns ``None`` for a missing or expired key. ``put_blob`` replaces the
    value; ``ttl_s=None`` keeps it until replaced. Both raise
    :class:`~sealserve.errors.UnavailableError` when the store cannot be reached.
    """

    def get_blob(self, key: str) -> bytes | None: ...

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None: ...


class MemoryBlobStore:
    """A :class:`BlobStore` in process memory (tests, single-process servers)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._lock = threading.Lock()

    def get_blob(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            value, expires = item
            if expires is not None and time.monotonic() >= expires:
                del self._data[key]
                return None
            return value

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        expires = None if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._data[key] = (bytes(value), expires)

    def total_bytes(self, prefix: str = "") -> int:
        """Bytes held under keys starting with ``prefix`` (for state-size measurements)."""
        with self._lock:
            return sum(len(v) for k, (v, _) in self._data.items() if k.startswith(prefix))


@lru_cache(maxsize=65536)
def state_key(detector: str, model: str, account: str) -> str:
    """``detect/<detector>/<model>/<account>`` with model and account percent-encoded, so
    no account name can reach another account's (or a class set's) key."""
    return f"detect/{detector}/{quote(model, safe='')}/{quote(account, safe='')}"


def pack_arrays(kind: int, arrays: Sequence[npt.NDArray[np.generic]]) -> bytes:
    """Serialise ``arrays`` into one blob tagged with ``kind`` (a detector's state type)."""
    parts = [MAGIC, struct.pack("<BBB", VERSION, kind, len(arrays))]
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _CODES[a.dtype]
        parts.append(struct.pack(f"<BB{a.ndim}I", code, a.ndim, *a.shape))
        parts.append(a.tobytes())
    return b"".join(parts)


def unpack_arrays(blob: bytes, kind: int, *, key: str) -> list[npt.NDArray[np.generic]]:
    """Parse a blob written by :func:`pack_arrays` for the same ``kind``.

    Arrays are writable (views into one private copy of the blob). Raises
    :class:`~sealserve.errors.UnavailableError` when the blob is not detector state of
    this kind (a corrupted or foreign store entry): the caller treats it like a store
    failure rather than silently forgetting evidence.
    """
    try:
        if blob[:4] != MAGIC:
            raise ValueError("bad magic")
        version, got_kind, count = struct.unpack_from("<BBB", blob, 4)
        if version != VERSION:
            raise ValueError(f"unsupported version {version}")
        if got_kind != kind:
            raise ValueError(f"state kind {got_kind}, expected {kind}")
        # One writable copy of the whole blob; the arrays are views into it.
        buf = bytearray(blob)
        pos = 7
        out: list[npt.NDArray[np.generic]] = []
        for _ in range(count):
            code, ndim = buf[pos], buf[pos + 1]
            shape = struct.unpack_from(f"<{ndim}I", buf, pos + 2)
            pos += 2 + 4 * ndim
            dtype = _DTYPES[code]
            n = math.prod(shape)
            nbytes = n * dtype.itemsize
            if pos + nbytes > len(buf):
                raise ValueError("truncated")
            out.append(np.frombuffer(buf, dtype=dtype, count=n, offset=pos).reshape(shape))
            pos += nbytes
        if pos != len(buf):
            raise ValueError("trailing bytes")
        return out
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise UnavailableError(
            f"detector state under {key!r} is unreadable ({exc})",
            remedy="Delete the corrupted key from the state store; the detector restarts it.",
        ) from exc
