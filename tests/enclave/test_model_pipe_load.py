"""load_decrypted: the model reaches its loader through a pipe, only if all checks pass."""

from __future__ import annotations

import hashlib
import io
import os
import stat

import numpy as np
import pytest

from sealserve.enclave.model_file import encrypt_stream, generate_key, load_decrypted
from sealserve.errors import CryptoError, SealedFormatError
from tests.enclave.test_model_file import PLAIN, chunk_span, flip, forge, seal

KEY = generate_key()
CS = 64


def read_all(path: str) -> bytes:
    assert stat.S_ISFIFO(os.stat(path).st_mode)  # a pipe, not a file anywhere
    with open(path, "rb") as f:
        return f.read()


def sealed(plain: bytes, chunk_size: int = CS) -> io.BytesIO:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, key=KEY, key_id="m", chunk_size=chunk_size)
    out.seek(0)
    return out


@pytest.mark.parametrize("size", [1, CS, 5 * CS + 17, 3 << 20])
def test_loader_reads_the_plaintext(size: int) -> None:
    plain = os.urandom(size)
    assert load_decrypted(sealed(plain), key=KEY, loader=read_all) == plain


def test_expected_digest_checked() -> None:
    digest = hashlib.sha256(PLAIN).digest()
    assert load_decrypted(sealed(PLAIN), key=KEY, loader=read_all, expected_sha256=digest)
    with pytest.raises(SealedFormatError, match="is not the expected"):
        load_decrypted(sealed(PLAIN), key=KEY, loader=read_all, expected_sha256=bytes(32))


def test_wrong_key_refused_before_the_loader_starts() -> None:
    calls: list[str] = []
    with pytest.raises(SealedFormatError, match="wrong key"):
        load_decrypted(sealed(PLAIN), key=generate_key(), loader=lambda p: calls.append(p) or b"")
    assert calls == []


def test_tampered_chunk_fails_even_if_the_loader_succeeds() -> None:
    from tests.enclave import test_model_file as t

    blob = seal(PLAIN, key=t.KEY)
    bad = flip(blob, chunk_span(blob, 3).start + 2)
    got: list[bytes] = []
    with pytest.raises(SealedFormatError, match="chunk 3 failed authentication"):
        load_decrypted(io.BytesIO(bad), key=t.KEY, loader=lambda p: got.append(read_all(p)))
    assert len(got[0]) == 3 * CS  # only the authenticated chunks ever reached it


def test_digest_lie_drops_the_loaded_result() -> None:
    from tests.enclave import test_model_file as t

    with pytest.raises(SealedFormatError, match="does not match the header"):
        load_decrypted(io.BytesIO(forge(PLAIN, sha256=bytes(32))), key=t.KEY, loader=read_all)


def test_loader_error_propagates() -> None:
    def broken(path: str) -> None:
        raise ValueError("not an ONNX model")

    with pytest.raises(ValueError, match="not an ONNX model"):
        load_decrypted(sealed(os.urandom(3 << 20)), key=KEY, loader=broken)


def test_loader_that_stops_early_is_refused() -> None:
    def peek(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read(10)

    with pytest.raises(CryptoError, match="returned before reading the whole model"):
        load_decrypted(sealed(os.urandom(3 << 20)), key=KEY, loader=peek)


def test_onnxruntime_loads_through_the_pipe() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = load_decrypted(
        sealed(model.SerializeToString(), chunk_size=128),
        key=KEY,
        loader=lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]),
    )
    (y,) = session.run(None, {"x": np.ones((1, 3), dtype=np.float32)})
    assert y.tolist() == [[12.0, 15.0, 18.0, 21.0]]


HARDENED_PROBE = """
import io, os
from sealserve.enclave import model_file as mf
from sealserve.enclave.hardening import harden_process
key = mf.generate_key()
plain = os.urandom(3 << 20)
src = io.BytesIO()
mf.encrypt_stream(io.BytesIO(plain), src, key=key, key_id="m")
src.seek(0)
if os.geteuid() == 0:  # an unprivileged service user, as in production
    os.setgid(65534)
    os.setuid(65534)
report = harden_process(lock_memory=False)
assert report.step("not_dumpable").status == "applied", report


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


print(os.geteuid() != 0, mf.load_decrypted(src, key=key, loader=read_all) == plain)
"""


def test_works_in_a_hardened_unprivileged_process() -> None:
    # Not dumpable makes /proc/<pid> root-owned; the process must still open its own fd.
    import subprocess
    import sys

    from tests.conftest import ROOT, sealserve_env

    out = subprocess.run(
        [sys.executable, "-c", HARDENED_PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=sealserve_env(),
        check=True,
    )
    assert out.stdout.split() == ["True", "True"]
