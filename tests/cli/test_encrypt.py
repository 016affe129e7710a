"""``sealserve encrypt`` end to end on a small file."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from sealserve.cli.main import main
from sealserve.enclave.key_file import KeyFile
from sealserve.enclave.model_file import decrypt_to_bytes, read_header


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(os.urandom(10_000))
    return path


def test_encrypt_end_to_end(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "model.sealed"
    out.parent.mkdir()
    key_path = tmp_path / "keys" / "model.key"
    key_path.parent.mkdir()
    rc = main(
        [
            "encrypt",
            str(model),
            "--key-id",
            "model-v1",
            "--out",
            str(out),
            "--key-file",
            str(key_path),
            "--chunk-size",
            "4096",
        ]
    )
    assert rc == 0
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    printed = capsys.readouterr().out
    assert "key id:           model-v1" in printed
    assert f"plaintext sha256: {digest}" in printed
    assert f"written to {key_path.resolve()} (mode 0600)" in printed
    assert "3 chunk(s)" in printed
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = KeyFile.read(key_path)
    assert key.key_id == "model-v1"
    with out.open("rb") as f:
        assert read_header(f).key_id == "model-v1"
        f.seek(0)
        assert decrypt_to_bytes(f, key=key.key) == model.read_bytes()
    assert sorted(os.listdir(out.parent)) == ["model.sealed"]


def test_encrypt_refuses_key_next_to_output(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "model.sealed"
    out.parent.mkdir()
    rc = main(
        [
            "encrypt",
            str(model),
            "--key-id",
            "m",
            "--out",
            str(out),
            "--key-file",
            str(out.parent / "model.key"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "refusing to write the key file" in err and "next to the encrypted model" in err
    assert os.listdir(out.parent) == []


def test_encrypt_refuses_existing_output_and_empty_model(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.sealed"
    out.write_bytes(b"keep me")
    rc = main(
        [
            "encrypt",
            str(model),
            "--key-id",
            "m",
            "--out",
            str(out),
            "--key-file",
            str(tmp_path / "k" / "m.key"),
        ]
    )
    assert rc == 1
    assert "already exists; refusing to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"

    empty = model.parent / "empty.onnx"
    empty.write_bytes(b"")
    (tmp_path / "keys").mkdir()
    (tmp_path / "o").mkdir()
    key_path = tmp_path / "keys" / "e.key"
    rc = main(
        [
            "encrypt",
            str(empty),
            "--key-id",
            "m",
            "--out",
            str(tmp_path / "o" / "e.sealed"),
            "--key-file",
            str(key_path),
        ]
    )
    assert rc == 1
    assert "refusing to encrypt an empty model" in capsys.readouterr().err
    assert os.listdir(tmp_path / "o") == [] and not key_path.exists()


def test_encrypt_missing_output_dir_is_a_clear_error(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "encrypt",
            str(model),
            "--key-id",
            "m",
            "--out",
            str(tmp_path / "no" / "m.sealed"),
            "--key-file",
            str(tmp_path / "m.key"),
        ]
    )
    assert rc == 1
    assert "output directory" in capsys.readouterr().err
    assert not (tmp_path / "m.key").exists()
