"""Detector state blobs: compact, bounded, shared, and refused when corrupted."""

from __future__ import annotations

import numpy as np
import pytest

from sealserve.defense.detect import (
    DistributionConfig,
    DistributionDetector,
    MemoryBlobStore,
    PradaConfig,
    PradaDetector,
)
from sealserve.defense.detect.state import BlobStore, pack_arrays, unpack_arrays
from sealserve.errors import UnavailableError
from tests.defense.streams import digits_task, uniform_stream


def test_pack_roundtrip_keeps_dtypes_and_shapes() -> None:
    arrays = [
        np.arange(6, dtype=np.float16).reshape(2, 3),
        np.array([1.5], np.float64),
        np.zeros((0, 4), np.float32),
        np.array([7], np.int64),
    ]
    blob = pack_arrays(9, arrays)
    assert blob[:4] == b"SSDS" and blob[4] == 1
    back = unpack_arrays(blob, 9, key="k")
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    back[0][0, 0] = 5  # copies are writable
    assert back[0][0, 0] == 5


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"XXXX\x01\x01\x00", "bad magic"),
        (b"SSDS\x02\x01\x00", "unsupported version 2"),
        (b"SSDS\x01\x02\x00", "state kind 2, expected 1"),
        (b"SSDS\x01\x01\x01\x02\x01\x08\x00\x00\x00", "truncated"),
        (b"SSDS\x01\x01\x00junk", "trailing bytes"),
    ],
)
def test_corrupted_blob_is_a_store_failure(blob: bytes, why: str) -> None:
    with pytest.raises(UnavailableError, match=f"'acct' is unreadable \\({why}"):
        unpack_arrays(blob, 1, key="acct")


def test_detector_refuses_corrupted_state() -> None:
    store = MemoryBlobStore()
    det = PradaDetector(PradaConfig(n_features=4, n_classes=2), store)
    store.put_blob("detect/prada/m/a", b"garbage", ttl_s=None)
    with pytest.raises(UnavailableError, match="detect/prada/m/a"):
        det.observe_at_time("a", "m", [0, 0, 0, 0], 0, now=0)


def test_memory_store_is_a_blob_store_with_ttl() -> None:
    store = MemoryBlobStore()
    assert isinstance(store, BlobStore)
    store.put_blob("a", b"1", ttl_s=None)
    store.put_blob("b", b"2", ttl_s=0.0)
    assert store.get_blob("a") == b"1"
    assert store.get_blob("b") is None
    assert store.get_blob("missing") is None


def test_state_stays_under_one_megabyte_after_10000_queries() -> None:
    task = digits_task()
    store = MemoryBlobStore()
    labels_ref = task.predict(task.reference)
    prada = PradaDetector(PradaConfig(n_features=64, n_classes=5), store)
    dist = DistributionDetector(
        DistributionConfig(n_features=64, n_classes=5),
        store,
        task.reference,
        reference_labels=labels_ref,
    )
    rng = np.random.default_rng(3)
    # Uniform noise is the worst case for PRADA: nearly every query joins G_c.
    x = uniform_stream(10_000, rng)
    labels = task.predict(x)
    for i in range(x.shape[0]):
        prada.observe_at_time("acct", "m", x[i], int(labels[i]), now=float(i))
        dist.observe_at_time("acct", "m", x[i], int(labels[i]), now=float(i))
    total = store.total_bytes("detect/")
    assert 10_000 < total <= 1_000_000, total


def test_replicas_sharing_a_store_see_one_account() -> None:
    task = digits_task()
    x = task.split_b[:300]
    labels = task.predict(x)
    shared = MemoryBlobStore()
    cfg = PradaConfig(n_features=64, n_classes=5, min_distances=50)
    replicas = [PradaDetector(cfg, shared), PradaDetector(cfg, shared)]
    alone = PradaDetector(cfg, MemoryBlobStore())
    for i in range(x.shape[0]):
        a = replicas[i % 2].observe_at_time("acct", "m", x[i], int(labels[i]), now=float(i))
        b = alone.observe_at_time("acct", "m", x[i], int(labels[i]), now=float(i))
        assert a == b
    assert a.ready and "Shapiro-Wilk" in a.explanation


def test_account_names_cannot_reach_other_keys() -> None:
    from sealserve.defense.detect.state import state_key

    assert state_key("prada", "m", "x/3") == "detect/prada/m/x%2F3"
    assert state_key("prada", "m/x", "3") == "detect/prada/m%2Fx/3"
    store = MemoryBlobStore()
    det = PradaDetector(PradaConfig(n_features=4, n_classes=4), store)
    det.observe_at_time("x", "m", [1, 2, 3, 4], 3, now=0)
    # "x/3" would collide with account x's class-3 set without encoding.
    s = det.observe_at_time("x/3", "m", [1, 2, 3, 4], 0, now=0)
    assert "testing starts after" in s.explanation
    assert store.get_blob("detect/prada/m/x%2F3") is not None
