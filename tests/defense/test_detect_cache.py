"""Detector state held in process and written behind (defense/detect/cache.py): what a
replica that dies, a store that fails and a full cache do to it."""

from __future__ import annotations

import numpy as np
import pytest

from sealserve.defense.detect import MemoryBlobStore
from sealserve.defense.detect.cache import StateCache, load_state, save_state
from sealserve.defense.detect.state import pack_arrays, unpack_arrays
from sealserve.errors import UnavailableError
from tests.defense.streams import digits_task, uniform_stream
from tests.defense.test_detection_digits import make_suite


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FlakyStore(MemoryBlobStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.puts = 0
        self.gets = 0

    def get_blob(self, key: str) -> bytes | None:
        self.gets += 1
        if self.down:
            raise UnavailableError("store down")
        return super().get_blob(key)

    def put_blob(self, key: str, value: bytes, *, ttl_s: float | None) -> None:
        if self.down:
            raise UnavailableError("store down")
        self.puts += 1
        super().put_blob(key, value, ttl_s=ttl_s)


def arrays(n: int) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.int64), np.zeros((2, 3), np.uint8)]


def test_state_is_held_and_written_behind_once_per_flush() -> None:
    store = FlakyStore()
    cache = StateCache(store, flush_s=3600)  # the test flushes by hand
    assert load_state(cache, "k", 1) is None
    save_state(cache, "k", 1, arrays(4), ttl_s=60)
    for _ in range(100):  # a detector's read-modify-write per row
        a = load_state(cache, "k", 1)
        assert a is not None
        a[0][0] += 1
        save_state(cache, "k", 1, a, ttl_s=60)
    assert store.puts == 0 and store.gets == 1  # one read (a miss), no write yet
    assert cache.flush() == 1
    assert store.puts == 1
    got = unpack_arrays(store.get_blob("k") or b"", 1, key="k")
    assert int(got[0][0]) == 100
    # Another replica (a fresh cache over the same store) reads what was written.
    other = StateCache(store, flush_s=3600)
    assert int(load_state(other, "k", 1)[0][0]) == 100  # type: ignore[index]
    cache.close()
    other.close()


def test_a_store_outage_keeps_the_changes_and_writes_them_later() -> None:
    store = FlakyStore()
    cache = StateCache(store, flush_s=3600)
    save_state(cache, "a", 1, arrays(3), ttl_s=None)
    save_state(cache, "b", 1, arrays(5), ttl_s=None)
    store.down = True
    with pytest.raises(UnavailableError):
        cache.flush()
    # Requests go on while the store is down: the held state answers.
    assert load_state(cache, "a", 1) is not None
    store.down = False
    assert cache.flush() == 2
    assert store.get_blob("a") is not None and store.get_blob("b") is not None
    assert cache.flush() == 0  # nothing changed since
    cache.close()


def test_a_full_cache_writes_what_it_drops_and_never_reads_back_stale_state() -> None:
    store = FlakyStore()
    store.put_blob("old", pack_arrays(1, arrays(2)), ttl_s=None)  # stale copy in the store
    one = sum(a.nbytes for a in arrays(1000)) + 64
    cache = StateCache(store, flush_s=3600, max_bytes=3 * one)
    first = arrays(1000)
    first[0][0] = 42
    save_state(cache, "old", 1, first, ttl_s=None)
    for i in range(5):
        save_state(cache, f"k{i}", 1, arrays(1000), ttl_s=None)
    assert len(cache) <= 3 and cache.nbytes <= 3 * one
    # "old" was dropped from memory before any flush: its change is not lost.
    assert int(load_state(cache, "old", 1)[0][0]) == 42  # type: ignore[index]
    cache.flush()
    assert int(unpack_arrays(store.get_blob("old") or b"", 1, key="old")[0][0]) == 42
    cache.close()


def test_held_state_expires_with_its_ttl_and_is_reread_after_reload_s() -> None:
    store = FlakyStore()
    clock = Clock()
    cache = StateCache(store, flush_s=3600, reload_s=10, monotonic=clock)
    save_state(cache, "t", 1, arrays(3), ttl_s=5)
    clock.t += 6
    store.down = True  # an expired key is not served from memory...
    with pytest.raises(UnavailableError):
        load_state(cache, "t", 1)
    store.down = False
    assert load_state(cache, "t", 1) is None  # ...and the store never got it (no flush)
    # A clean key is re-read once reload_s has passed (another replica wrote it).
    store.put_blob("r", pack_arrays(1, arrays(2)), ttl_s=None)
    assert load_state(cache, "r", 1) is not None
    gets = store.gets
    load_state(cache, "r", 1)
    assert store.gets == gets
    newer = arrays(7)
    store.put_blob("r", pack_arrays(1, newer), ttl_s=None)
    clock.t += 11
    assert load_state(cache, "r", 1)[0].shape == (7,)  # type: ignore[index]
    cache.close()


def test_close_writes_everything_and_a_restart_continues_detection() -> None:
    """A graceful stop loses no detector evidence: a noise stream that was suspended
    before a restart is judged the same after it."""
    task = digits_task()
    rng = np.random.default_rng(3)
    noise = uniform_stream(60, rng)
    store = MemoryBlobStore()
    direct = make_suite(MemoryBlobStore())  # the same rows, no cache, no restart
    cache = StateCache(store, flush_s=3600)
    suite = make_suite(cache)
    for i, x in enumerate(noise[:40]):
        label = int(task.model.predict(x[None, :])[0])
        direct.observe_at_time("t", "digits", x, label, now=1000.0 + i)
        suite.observe_at_time("t", "digits", x, label, now=1000.0 + i)
    cache.close()
    again = make_suite(StateCache(store, flush_s=3600))
    for i, x in enumerate(noise[40:], start=40):
        label = int(task.model.predict(x[None, :])[0])
        want = direct.observe_at_time("t", "digits", x, label, now=1000.0 + i)
        got = again.observe_at_time("t", "digits", x, label, now=1000.0 + i)
        assert [s.detector for s in got.scores] == [s.detector for s in want.scores]
        assert got.score == pytest.approx(want.score), i


def test_the_writer_thread_flushes_on_its_own() -> None:
    import time

    store = FlakyStore()
    cache = StateCache(store, flush_s=0.05)
    save_state(cache, "w", 1, arrays(3), ttl_s=None)
    deadline = time.monotonic() + 10
    while store.get_blob("w") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get_blob("w") is not None
    cache.close()
