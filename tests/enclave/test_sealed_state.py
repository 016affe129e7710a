"""Sealed state: bound to the sealing key (the measurement) and to the label.

The platform is not part of this module: its ``sealing_key(label)`` is bound to the
launch measurement. These tests stand in for it with HKDF over a fake measurement, so
two measurements give two keys, as on the platform.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealserve.enclave.sealed_state import SealedBox, SealedFile
from sealserve.errors import CryptoError, SealedFormatError, UnavailableError

MEASUREMENT_A = bytes(range(48))
MEASUREMENT_B = bytes(range(1, 49))


def sealing_key(measurement: bytes, label: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"test sealing " + label
    ).derive(measurement)


def box(measurement: bytes, label: bytes = b"ledger") -> SealedBox:
    return SealedBox(sealing_key(measurement, label))


def test_round_trip() -> None:
    blob = box(MEASUREMENT_A).seal(b"state", label=b"ledger")
    assert blob.startswith(b"SEALSTAT\x01") and b"state" not in blob
    assert box(MEASUREMENT_A).unseal(blob, label=b"ledger") == b"state"
    assert box(MEASUREMENT_A).unseal(box(MEASUREMENT_A).seal(b"", label=b"x"), label=b"x") == b""


def test_other_measurement_cannot_unseal() -> None:
    blob = box(MEASUREMENT_A).seal(b"state", label=b"ledger")
    with pytest.raises(CryptoError, match="another key \\(a different measurement"):
        box(MEASUREMENT_B).unseal(blob, label=b"ledger")


def test_other_label_cannot_unseal() -> None:
    b = box(MEASUREMENT_A)
    blob = b.seal(b"state", label=b"ledger")
    with pytest.raises(CryptoError, match="label b'audit-key' failed authentication"):
        b.unseal(blob, label=b"audit-key")


def test_modified_blob_refused() -> None:
    b = box(MEASUREMENT_A)
    blob = bytearray(b.seal(b"state", label=b"ledger"))
    blob[-1] ^= 1
    with pytest.raises(CryptoError, match="failed authentication"):
        b.unseal(bytes(blob), label=b"ledger")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"NOTSEALD\x01" + b"\x00" * 40, "bad magic"),
        (b"SEALSTAT\x01" + b"\x00" * 10, "bad magic or length"),
        (b"SEALSTAT\x02" + b"\x00" * 40, "unsupported sealed state version 2"),
    ],
)
def test_not_sealed_state_refused(blob: bytes, message: str) -> None:
    with pytest.raises(SealedFormatError, match=message):
        box(MEASUREMENT_A).unseal(blob, label=b"ledger")


def test_key_and_label_validated() -> None:
    with pytest.raises(CryptoError, match="sealing key must be 32 bytes"):
        SealedBox(b"short")
    with pytest.raises(CryptoError, match="sealing label must be"):
        box(MEASUREMENT_A).seal(b"x", label=b"")
    assert "key hidden" in repr(box(MEASUREMENT_A))


def test_sealed_file_round_trip_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sealed"
    f = SealedFile(path, box(MEASUREMENT_A), label=b"ledger")
    assert not f.exists()
    f.write(b"v1")
    f.write(b"v2")
    assert f.read() == b"v2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["ledger.sealed"]  # no temp file left behind
    assert b"v2" not in path.read_bytes()


def test_sealed_file_from_another_measurement_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sealed"
    SealedFile(path, box(MEASUREMENT_A), label=b"ledger").write(b"secret")
    with pytest.raises(CryptoError, match="different measurement"):
        SealedFile(path, box(MEASUREMENT_B), label=b"ledger").read()


def test_sealed_file_missing_or_unwritable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="cannot read sealed file"):
        SealedFile(tmp_path / "none", box(MEASUREMENT_A), label=b"l").read()
    with pytest.raises(UnavailableError, match="cannot write sealed file"):
        SealedFile(tmp_path / "no-dir" / "f", box(MEASUREMENT_A), label=b"l").write(b"x")
