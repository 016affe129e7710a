"""Key files: format, 0600, never next to the encrypted model."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sealserve.enclave.key_file import KeyFile, check_key_location
from sealserve.errors import ConfigError, CryptoError, SealedFormatError


def test_bytes_round_trip_and_repr_hides_the_key() -> None:
    kf = KeyFile.generate("model-a")
    again = KeyFile.from_bytes(kf.to_bytes())
    assert again == kf and len(kf.key) == 32
    assert kf.key.hex() not in repr(kf) and "model-a" in repr(kf)


def test_constructor_validates_the_key() -> None:
    with pytest.raises(CryptoError, match="must be 32 bytes, got 31"):
        KeyFile("m", b"k" * 31)
    with pytest.raises(CryptoError, match="key id must be"):
        KeyFile("", b"k" * 32)


def test_write_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "keys").mkdir()
    old = os.umask(0)
    try:
        path = KeyFile.generate("m").write(
            tmp_path / "keys" / "m.key", encrypted_output=tmp_path / "out" / "m.sealed"
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyFile.read(path).key_id == "m"


@pytest.mark.parametrize("where", ["same-dir", "sub-dir"])
def test_key_next_to_the_output_refused(tmp_path: Path, where: str) -> None:
    key_path = tmp_path / "m.key" if where == "same-dir" else tmp_path / "keys" / "m.key"
    key_path.parent.mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=r"refusing to write the key file .* next to the"):
        KeyFile.generate("m").write(key_path, encrypted_output=tmp_path / "m.sealed")
    assert not key_path.exists()


def test_key_through_a_symlink_into_the_output_dir_refused(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "alias").symlink_to(out_dir)
    with pytest.raises(ConfigError, match="next to the encrypted model"):
        check_key_location(tmp_path / "alias" / "m.key", encrypted_output=out_dir / "m.sealed")


def test_key_in_a_parent_or_sibling_dir_allowed(tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.sealed"
    (tmp_path / "keys").mkdir()
    assert check_key_location(tmp_path / "m.key", encrypted_output=out) == tmp_path / "m.key"
    sibling = tmp_path / "keys" / "m.key"
    assert check_key_location(sibling, encrypted_output=out) == sibling


def test_key_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key file directory .* does not exist"):
        check_key_location(tmp_path / "nope" / "m.key", encrypted_output=tmp_path / "o" / "m")


def test_existing_key_file_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    path = tmp_path / "keys" / "m.key"
    path.write_bytes(b"old key")
    with pytest.raises(ConfigError, match="already exists; refusing to overwrite a key"):
        KeyFile.generate("m").write(path, encrypted_output=tmp_path / "out" / "m.sealed")
    assert path.read_bytes() == b"old key"


def test_read_refuses_a_group_or_world_readable_key(tmp_path: Path) -> None:
    path = tmp_path / "m.key"
    path.write_bytes(KeyFile.generate("m").to_bytes())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 0644\)"):
        KeyFile.read(path)


def test_read_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read key file"):
        KeyFile.read(tmp_path / "nope.key")


def _corrupt(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1
    return bytes(b)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: _corrupt(d, 0), "bad magic: not a sealserve key file"),
        (lambda d: _corrupt(d, 8), "unsupported key file version 0"),
        (lambda d: d[:-1], "wrong length"),
        (lambda d: d + b"\x00", "wrong length"),
        (lambda d: _corrupt(d, 20), "checksum does not match"),
        (lambda d: b"", "bad magic"),
    ],
    ids=["magic", "version", "truncated", "padded", "bit-flip", "empty"],
)
def test_malformed_key_file_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = KeyFile.generate("m").to_bytes()
    with pytest.raises(SealedFormatError, match=message):
        KeyFile.from_bytes(mutate(data))
