"""Per-account detector state held in process and written behind to the shared store.

Without it every detector reads, unpacks, repacks and writes its state blob on every
row: on SQLite or Redis that is two store round trips per detector per row, most of the
defended path's CPU. :class:`StateCache` keeps each key's arrays in process (the
detector updates them in place) and a background thread writes the changed ones to the
store every ``flush_s`` seconds, packed once. Verdicts do not wait for the flush: a
detector's status is written to the store at once, as before, so every replica enforces
it at the next admission.

What the cache changes, on purpose:

- A process that dies (kill -9, a crash) loses at most ``flush_s`` of detector evidence;
  ``close()`` writes everything at a graceful stop.
- Between flushes each replica (and each worker process) updates its own copy: an
  account whose requests are spread over k replicas is judged by each on the rows it
  sees (rates and shares, which the detectors measure, are the same; the volume
  detector's counts are per replica). A key is read from the store when this process
  first needs it and again after ``reload_s`` without local changes.
- Memory is bounded by ``max_bytes``: the least recently used keys are written (when
  changed) and dropped first.

A store outage during a flush keeps the changes in memory and retries at the next
flush; the request path never waits for the store except to read a key this process
does not hold yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sealserve.defense.detect.state import BlobStore, pack_arrays, unpack_arrays
from sealserve.errors import UnavailableError

log = logging.getLogger("sealserve.defense")

DEFAULT_FLUSH_S = 1.0
DEFAULT_RELOAD_S = 30.0
DEFAULT_MAX_BYTES = 256 << 20

Arrays = list[npt.NDArray[np.generic]]


@dataclass(slots=True)
class _Entry:
    kind: int
    arrays: Arrays
    ttl_s: float | None
    expires: float | None  # monotonic; None: kept until replaced
    loaded: float  # monotonic time it was read from the store or last written there
    dirty: bool
    nbytes: int


def _nbytes(arrays: Sequence[npt.NDArray[np.generic]]) -> int:
    return sum(a.nbytes for a in arrays) + 64


class StateCache:
    """A :class:`~sealserve.defense.detect.state.BlobStore` for detectors that keeps
    state arrays in process and writes them behind (see the module docstring).

    ``get_blob``/``put_blob`` pass through to the store (for keys that are not detector
    state); detectors use :meth:`load` and :meth:`save` through
    :func:`load_state`/:func:`save_state`.
    """

    def __init__(
        self,
        store: BlobStore,
        *,
        flush_s: float = DEFAULT_FLUSH_S,
        reload_s: float = DEFAULT_RELOAD_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if flush_s <= 0 or reload_s <= 0 or max_bytes <= 0:
            raise ValueError("flush_s, reload_s and max_bytes must be positive")
        self.store = store
        self.flush_s = flush_s
        self.reload_s = reload_s
        self.max_bytes = max_bytes
        self._monotonic = monotonic
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._evicted: dict[str, tuple[bytes, float | None]] = {}  # packed, to write
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    # -- BlobStore (pass-through) -------------------------------------------------

    def get_blob(self, key: str) -> bytes | None:
        return self.store.get_blob(key)

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        self.store.put_blob(key, value, ttl_s=ttl_s)

    # -- detector state -----------------------------------------------------------

    def load(self, key: str, kind: int) -> Arrays | None:
        """The arrays under ``key`` (the cached objects: update them in place, then
        :meth:`save`), or None when the store has none. Raises UnavailableError when
        the key must be read and the store cannot be reached, or holds another kind."""
        now = self._monotonic()
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                if e.expires is not None and now >= e.expires:
                    self._drop(key, e)
                elif e.dirty or now - e.loaded < self.reload_s:
                    if e.kind != kind:
                        raise UnavailableError(f"detector state under {key!r} is another kind")
                    self._entries.move_to_end(key)
                    return e.arrays
            pending = self._evicted.get(key)
        blob = pending[0] if pending is not None else self.store.get_blob(key)
        if blob is None:
            return None
        arrays = unpack_arrays(blob, kind, key=key)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.dirty:  # another thread saved it meanwhile
                return e.arrays
            if e is not None:
                self._drop(key, e)
            self._insert(key, _Entry(kind, arrays, None, None, now, False, _nbytes(arrays)))
        return arrays

    def save(
        self, key: str, kind: int, arrays: Sequence[npt.NDArray[np.generic]], *,
        ttl_s: float | None,
    ) -> None:  # fmt: skip
        """Hold ``arrays`` as the state under ``key``; written to the store at the next
        flush (with ``ttl_s``, which also bounds how long this process keeps it)."""
        now = self._monotonic()
        expires = None if ttl_s is None else now + ttl_s
        entry = _Entry(kind, list(arrays), ttl_s, expires, now, True, _nbytes(arrays))
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._drop(key, old)
            self._evicted.pop(key, None)
            self._insert(key, entry)
        self._ensure_thread()

    def flush(self) -> int:
        """Write every changed key to the store now; returns how many were written.
        Raises UnavailableError when the store fails (the unwritten keys stay changed)."""
        with self._lock:
            batch = dict(self._evicted)
            self._evicted.clear()
            taken: list[_Entry] = []
            for key, e in self._entries.items():
                if e.dirty:
                    e.dirty = False
                    taken.append(e)
                    batch[key] = (pack_arrays(e.kind, e.arrays), e.ttl_s)
        written = 0
        try:
            for key, (blob, ttl_s) in batch.items():
                self.store.put_blob(key, blob, ttl_s=ttl_s)
                written += 1
        except UnavailableError:
            with self._lock:  # keep what was not written, changed again or not
                keys = list(batch)[written:]
                for key in keys:
                    held = self._entries.get(key)
                    if held is not None:
                        held.dirty = True
                    elif key not in self._evicted:
                        self._evicted[key] = batch[key]
            raise
        now = self._monotonic()
        with self._lock:
            for e in taken:
                e.loaded = now
        return written

    def close(self) -> None:
        """Stop the writer and write what changed (at a graceful stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except UnavailableError as exc:
            log.warning("detector state not written at stop (the store failed): %s", exc)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- internals ----------------------------------------------------------------

    def _insert(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            old_key, old = next(iter(self._entries.items()))
            if old.dirty:
                self._evicted[old_key] = (pack_arrays(old.kind, old.arrays), old.ttl_s)
            self._drop(old_key, old)

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.nbytes

    def _ensure_thread(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name="sealserve-detector-state",
                                     daemon=True)  # fmt: skip
                self._thread = t
                t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                if self._failures:
                    log.warning("detector state: the store is back; changes written")
                self._failures = 0
            except UnavailableError as exc:
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("detector state not written (%d tries; kept in memory): %s",
                                self._failures, exc)  # fmt: skip
            except Exception:  # never let the writer die silently
                log.exception("detector state writer failed; retrying")


def load_state(store: BlobStore, key: str, kind: int) -> Arrays | None:
    """A detector's state arrays under ``key`` (None: none yet), from the cache when
    ``store`` is a :class:`StateCache`, else read and unpacked from the store."""
    if isinstance(store, StateCache):
        return store.load(key, kind)
    blob = store.get_blob(key)
    return None if blob is None else unpack_arrays(blob, kind, key=key)


def save_state(
    store: BlobStore, key: str, kind: int, arrays: Sequence[npt.NDArray[np.generic]], *,
    ttl_s: float | None,
) -> None:  # fmt: skip
    """Store a detector's state arrays (held and written behind by a :class:`StateCache`)."""
    if isinstance(store, StateCache):
        store.save(key, kind, arrays, ttl_s=ttl_s)
    else:
        store.put_blob(key, pack_arrays(kind, arrays), ttl_s=ttl_s)
