"""Encrypted models on the server: keys from a key file or released by the broker after
attestation; plaintext never touches the disk; tampered files refused; the manifest
announces the header's digest."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve.client import Client
from sealserve.enclave.key_file import KeyFile
from sealserve.enclave.model_file import encrypt_stream
from sealserve.errors import ConfigError, SealedFormatError
from tests.server import models

X = {"x": np.ones((2, 64), np.float32)}


def _encrypt_repo(tmp: Path) -> tuple[Path, bytes, Path]:
    """A repository whose 'matmul' model is encrypted; returns (repo, plaintext, key file)."""
    plain_repo = tmp / "plain"
    models.matmul(plain_repo, n_in=64, n_out=32, seed=11)
    plaintext = (plain_repo / "matmul" / "1" / "model.onnx").read_bytes()
    repo = tmp / "repo"
    (repo / "matmul" / "1").mkdir(parents=True)
    keys = tmp / "keys"
    keys.mkdir()
    kf = KeyFile.generate("matmul-key")
    with (
        (plain_repo / "matmul" / "1" / "model.onnx").open("rb") as src,
        (repo / "matmul" / "1" / "model.sealed").open("wb") as dst,
    ):
        encrypt_stream(src, dst, key=kf.key, key_id="matmul-key", chunk_size=4096)
    key_path = kf.write(
        keys / "matmul.key", encrypted_output=repo / "matmul" / "1" / "model.sealed"
    )
    (repo / "matmul" / "config.toml").write_text(f'[encryption]\nkey_file = "{key_path}"\n')
    import shutil

    shutil.rmtree(plain_repo)  # the server must never see the plaintext file
    return repo, plaintext, key_path


class Inotify:
    """Records file creations and writes under some directories (Linux inotify)."""

    MASK = 0x00000100 | 0x00000002 | 0x00000008 | 0x00000080  # CREATE|MODIFY|CLOSE_WRITE|MOVED_TO

    def __init__(self, dirs: list[Path]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._libc = libc
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        self.watches: dict[int, Path] = {}
        for d in dirs:
            wd = libc.inotify_add_watch(self.fd, str(d).encode(), self.MASK)
            if wd >= 0:
                self.watches[wd] = d

    def events(self) -> list[Path]:
        out: list[Path] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            pos = 0
            while pos < len(buf):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                out.append(self.watches.get(wd, Path("?")) / name)
                pos += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def _all_dirs(root: Path) -> list[Path]:
    return [root, *[p for p in root.rglob("*") if p.is_dir()]]


def test_encrypted_model_served_and_no_plaintext_on_disk(
    start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, plaintext, _ = _encrypt_repo(tmp_path)
    scratch = tmp_path / "scratch-tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    watched = [*_all_dirs(tmp_path), Path("/dev/shm"), Path.cwd()]
    watcher = Inotify(watched)
    (scratch / "probe").write_bytes(b"x")  # the watcher sees writes: it can fail
    assert scratch / "probe" in watcher.events()
    try:
        running = start_server(model_repository=repo, unsafe_plaintext=True)
        events = watcher.events()
    finally:
        watcher.close()
    assert events == [], f"files were written while loading an encrypted model: {events}"
    # The plaintext is nowhere on disk under the watched trees either.
    marker = plaintext[len(plaintext) // 2 : len(plaintext) // 2 + 64]
    for d in watched:
        for f in d.iterdir() if d.is_dir() else ():
            if f.is_file() and f.stat().st_size < 50_000_000:
                with contextlib.suppress(PermissionError):
                    assert marker not in f.read_bytes(), f"plaintext found in {f}"
    with Client(running.target, unsafe_plaintext=True) as c:
        assert c.infer("matmul", X)["y"].shape == (2, 32)
    # The manifest announces the plaintext digest and the key id from the header.
    m = {x.name: x for x in running.server.manifest.models}
    import hashlib

    assert m["matmul"].sha256 == hashlib.sha256(plaintext).hexdigest()
    assert m["matmul"].key_id == "matmul-key"


def test_tampered_encrypted_model_refused(start_server: Any, tmp_path: Path) -> None:
    repo, _, _ = _encrypt_repo(tmp_path)
    sealed = repo / "matmul" / "1" / "model.sealed"
    data = bytearray(sealed.read_bytes())
    data[len(data) - 100] ^= 1
    sealed.write_bytes(bytes(data))
    with pytest.raises(SealedFormatError, match="failed authentication"):
        start_server(model_repository=repo, unsafe_plaintext=True)


def test_encrypted_model_without_key_source_is_a_config_error(
    start_server: Any, tmp_path: Path
) -> None:
    repo, _, _ = _encrypt_repo(tmp_path)
    (repo / "matmul" / "config.toml").unlink()
    with pytest.raises(ConfigError, match="no \\[key_broker\\] is configured"):
        start_server(model_repository=repo, unsafe_plaintext=True)
