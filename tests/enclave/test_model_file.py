"""The encrypted model format: round trips, every tamper case, memory bounds."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

from sealserve.enclave import model_file as mf
from sealserve.enclave.model_file import (
    TAG_SIZE,
    decrypt_to_bytes,
    encrypt_stream,
    generate_key,
    read_header,
)
from sealserve.errors import CryptoError, SealedFormatError

CS = 64  # small chunks so "many chunks" stays tiny
KEY = generate_key()


def seal(plain: bytes, *, key: bytes = KEY, chunk_size: int = CS, key_id: str = "m1") -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, key=key, key_id=key_id, chunk_size=chunk_size)
    return out.getvalue()


def open_(blob: bytes, *, key: bytes = KEY) -> bytes:
    return decrypt_to_bytes(io.BytesIO(blob), key=key)


def layout(blob: bytes) -> tuple[int, int]:
    """(header length, chunk count) of a sealed blob."""
    h = read_header(io.BytesIO(blob))
    return len(h.raw), h.chunk_count


def chunk_span(blob: bytes, index: int) -> slice:
    hl, count = layout(blob)
    start = hl + index * (CS + TAG_SIZE)
    end = len(blob) if index == count - 1 else start + CS + TAG_SIZE
    return slice(start, end)


def flip(blob: bytes, offset: int) -> bytes:
    b = bytearray(blob)
    b[offset] ^= 0x01
    return bytes(b)


PLAIN = os.urandom(5 * CS + 17)  # 6 chunks, the last one short


@pytest.mark.parametrize(
    "size",
    [1, CS - 1, CS, CS + 1, 4 * CS, 5 * CS + 17, 100 * CS + 3],
    ids=[
        "1-byte",
        "under-one-chunk",
        "one-chunk",
        "one-chunk-plus-1",
        "exact-multiple",
        "not-multiple",
        "many-chunks",
    ],
)
def test_round_trip_every_size_class(size: int) -> None:
    plain = os.urandom(size)
    blob = seal(plain)
    header = read_header(io.BytesIO(blob))
    assert header.key_id == "m1"
    assert header.plaintext_length == size
    assert header.chunk_count == -(-size // CS)
    assert header.plaintext_sha256 == hashlib.sha256(plain).digest()
    assert header.ciphertext_length == len(blob)
    out = open_(blob)
    assert type(out) is bytes  # onnxruntime takes bytes, not bytearray
    assert out == plain


def test_round_trip_default_chunk_size_across_chunks() -> None:
    plain = os.urandom(2 * mf.DEFAULT_CHUNK_SIZE + 5)
    out = io.BytesIO()
    header = encrypt_stream(io.BytesIO(plain), out, key=KEY, key_id="big")
    assert header.chunk_count == 3
    assert decrypt_to_bytes(io.BytesIO(out.getvalue()), key=KEY) == plain


def test_same_plaintext_encrypts_differently_each_time() -> None:
    a, b = seal(PLAIN), seal(PLAIN)
    assert a != b
    assert open_(a) == open_(b) == PLAIN


def test_empty_model_refused() -> None:
    with pytest.raises(CryptoError, match="refusing to encrypt an empty model"):
        seal(b"")


def test_bad_key_length_refused_on_both_sides() -> None:
    with pytest.raises(CryptoError, match="must be 32 bytes, got 16"):
        seal(PLAIN, key=b"k" * 16)
    with pytest.raises(CryptoError, match="must be 32 bytes, got 31"):
        open_(seal(PLAIN), key=b"k" * 31)


def test_generate_key_is_32_random_bytes() -> None:
    a, b = generate_key(), generate_key()
    assert len(a) == len(b) == 32 and a != b


@pytest.mark.parametrize("key_id", ["", "x" * 257, "tab\tid"])
def test_bad_key_id_refused(key_id: str) -> None:
    with pytest.raises(CryptoError, match="key id must be"):
        seal(PLAIN, key_id=key_id)


@pytest.mark.parametrize("chunk_size", [0, 15, mf.MAX_CHUNK_SIZE + 1])
def test_bad_chunk_size_refused(chunk_size: int) -> None:
    with pytest.raises(CryptoError, match="chunk size must be"):
        seal(PLAIN, chunk_size=chunk_size)


def test_unseekable_source_refused() -> None:
    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

    with pytest.raises(CryptoError, match="seekable"):
        encrypt_stream(Pipe(), io.BytesIO(), key=KEY, key_id="m")  # type: ignore[arg-type]


def test_model_changing_between_passes_refused() -> None:
    class Shifty(io.BytesIO):
        def seek(self, pos: int, whence: int = 0) -> int:
            if self.tell() == len(PLAIN) and whence == 0:  # rewind after the hash pass
                self.getbuffer()[3] ^= 1
            return super().seek(pos, whence)

    with pytest.raises(CryptoError, match="changed while it was being encrypted"):
        encrypt_stream(Shifty(PLAIN), io.BytesIO(), key=KEY, key_id="m", chunk_size=CS)


def test_progress_reports_both_passes() -> None:
    seen: list[tuple[int, int]] = []
    encrypt_stream(
        io.BytesIO(PLAIN),
        io.BytesIO(),
        key=KEY,
        key_id="m",
        chunk_size=CS,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = 2 * len(PLAIN)
    assert {t for _, t in seen} == {total}
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == total
    assert len(PLAIN) in dones and len([d for d in dones if d < len(PLAIN)]) >= 5


def test_wrong_key_refused() -> None:
    with pytest.raises(SealedFormatError, match=r"wrong key: .*key id 'm1'"):
        open_(seal(PLAIN), key=generate_key())


# --- header tampering -------------------------------------------------------------------

HEADER_FIELDS = {
    # field: (offset from the start of the header, expected message)
    "magic": (0, "bad magic"),
    "version": (8, "unsupported format version 0"),
    "key_id": (11, "header failed authentication"),
    "chunk_size": (11 + 2 + 3, "header failed authentication"),
    "length": (11 + 2 + 4 + 7, "header failed authentication"),
    "sha256": (11 + 2 + 12, "header failed authentication"),
    "salt": (11 + 2 + 12 + 32, "wrong key"),
    "commitment": (11 + 2 + 12 + 64, "wrong key"),
    "mac": (11 + 2 + 12 + 96, "header failed authentication"),
}


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_header_bit_flip_refused(field: str) -> None:
    offset, message = HEADER_FIELDS[field]
    blob = seal(PLAIN, key_id="m1")  # 2-byte key id: offsets above assume it
    assert layout(blob)[0] == 11 + 2 + 12 + 128
    with pytest.raises(SealedFormatError, match=message):
        open_(flip(blob, offset))


def test_header_out_of_range_fields_refused_before_any_key_use() -> None:
    blob = bytearray(seal(PLAIN))
    blob[9:11] = b"\x00\x00"
    with pytest.raises(SealedFormatError, match="key id length 0 is out of range"):
        read_header(io.BytesIO(bytes(blob)))
    blob = bytearray(seal(PLAIN, key_id="m1"))
    blob[13:17] = (1).to_bytes(4, "big")
    with pytest.raises(SealedFormatError, match="chunk size 1 is out of range"):
        read_header(io.BytesIO(bytes(blob)))
    blob = bytearray(seal(PLAIN, key_id="m1"))
    blob[17:25] = (0).to_bytes(8, "big")
    with pytest.raises(SealedFormatError, match="plaintext length 0 is out of range"):
        read_header(io.BytesIO(bytes(blob)))


def test_header_of_another_file_refused() -> None:
    a, b = seal(PLAIN), seal(PLAIN)
    hl, _ = layout(a)
    with pytest.raises(SealedFormatError, match="chunk 0 failed authentication"):
        open_(b[:hl] + a[hl:])


# --- chunk tampering --------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 5], ids=["first", "middle", "last"])
@pytest.mark.parametrize("where", ["ciphertext", "tag"])
def test_chunk_bit_flip_refused(index: int, where: str) -> None:
    blob = seal(PLAIN)
    span = chunk_span(blob, index)
    offset = span.start + 1 if where == "ciphertext" else span.stop - 1
    with pytest.raises(SealedFormatError, match=f"chunk {index} failed authentication"):
        open_(flip(blob, offset))


def test_chunk_reorder_refused() -> None:
    blob = seal(PLAIN)
    one, two = chunk_span(blob, 1), chunk_span(blob, 2)
    swapped = blob[: one.start] + blob[two] + blob[one] + blob[two.stop :]
    assert len(swapped) == len(blob)
    with pytest.raises(SealedFormatError, match="chunk 1 failed authentication"):
        open_(swapped)


def test_chunk_spliced_from_another_file_under_the_same_key_refused() -> None:
    a, b = seal(PLAIN), seal(PLAIN)
    span = chunk_span(a, 2)
    spliced = a[: span.start] + b[span] + a[span.stop :]
    with pytest.raises(SealedFormatError, match="chunk 2 failed authentication"):
        open_(spliced)


def test_last_chunk_moved_to_the_end_of_a_shorter_file_refused() -> None:
    # Same key, same header digest cannot be had without the key; this checks the
    # final-chunk flag path by replacing the last chunk with an earlier full one.
    blob = seal(os.urandom(4 * CS))
    last, first = chunk_span(blob, 3), chunk_span(blob, 0)
    with pytest.raises(SealedFormatError, match="chunk 3 failed authentication"):
        open_(blob[: last.start] + blob[first])


# --- truncation and trailing data -------------------------------------------------------


def test_truncation_inside_the_header_refused() -> None:
    blob = seal(PLAIN)
    for cut in (0, 5, 9, 12, 40):
        with pytest.raises(SealedFormatError, match=r"file ends inside the header|bad magic"):
            open_(blob[:cut])


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        ("after_header", "file ends before the final chunk \\(chunk 0 of 6 is missing\\)"),
        ("mid_first_chunk", "chunk 0 of 6 is cut short"),
        ("mid_middle_chunk", "chunk 3 of 6 is cut short"),
        ("drop_final_chunk", "chunk 5 of 6 is missing"),
        ("drop_last_byte", "chunk 5 of 6 is cut short"),
    ],
)
def test_truncation_refused(cut: str, message: str) -> None:
    blob = seal(PLAIN)
    hl, _ = layout(blob)
    at = {
        "after_header": hl,
        "mid_first_chunk": hl + 10,
        "mid_middle_chunk": chunk_span(blob, 3).start + 30,
        "drop_final_chunk": chunk_span(blob, 5).start,
        "drop_last_byte": len(blob) - 1,
    }[cut]
    with pytest.raises(SealedFormatError, match=message):
        open_(blob[:at])


@pytest.mark.parametrize("extra", [b"\x00", os.urandom(CS + TAG_SIZE)])
def test_trailing_data_refused(extra: bytes) -> None:
    with pytest.raises(SealedFormatError, match="trailing data after the final chunk"):
        open_(seal(PLAIN) + extra)


# --- digests ----------------------------------------------------------------------------


def test_expected_digest_checked() -> None:
    blob = seal(PLAIN)
    good = hashlib.sha256(PLAIN).digest()
    assert decrypt_to_bytes(io.BytesIO(blob), key=KEY, expected_sha256=good) == PLAIN
    with pytest.raises(SealedFormatError, match="is not the expected"):
        decrypt_to_bytes(io.BytesIO(blob), key=KEY, expected_sha256=b"\x00" * 32)


def forge(plain: bytes, *, sha256: bytes) -> bytes:
    """A file written from the documented layout alone, with any header digest."""
    salt = os.urandom(32)
    keys = mf._FileKeys.derive(KEY, salt)
    body = (
        b"SEALONNX\x01\x00\x02m1"
        + struct.pack(">IQ", CS, len(plain))
        + sha256
        + salt
        + keys.commitment
    )
    raw = body + keys.header_mac(body)
    digest = hashlib.sha256(raw).digest()
    count = -(-len(plain) // CS)
    chunks = b""
    for i in range(count):
        aad = digest + struct.pack(">Q", i) + bytes([i == count - 1])
        nonce = keys.nonce_prefix + struct.pack(">Q", i)
        chunks += keys.aead.encrypt(nonce, plain[i * CS : (i + 1) * CS], aad)
    return raw + chunks


def test_file_written_from_the_spec_opens() -> None:
    assert open_(forge(PLAIN, sha256=hashlib.sha256(PLAIN).digest())) == PLAIN


def test_header_digest_that_lies_about_the_plaintext_refused() -> None:
    # Only a key holder can make such a file; the enclave still refuses to serve bytes
    # that do not hash to the digest it will attest to.
    with pytest.raises(SealedFormatError, match="plaintext SHA-256 does not match the header"):
        open_(forge(PLAIN, sha256=b"\x11" * 32))


# --- memory bounds ----------------------------------------------------------------------

MIB = 1 << 20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "big.bin"
    with path.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(MIB))
    return path


def test_encrypt_memory_is_bounded_by_chunks(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.sealed"
    with big_model.open("rb") as src, out.open("wb") as dst:
        tracemalloc.start()
        try:
            encrypt_stream(src, dst, key=KEY, key_id="big", chunk_size=MIB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 3 * MIB, f"encrypting 64 MiB peaked at {peak / MIB:.1f} MiB"
    assert out.stat().st_size == 64 * MIB + 64 * TAG_SIZE + layout(out.read_bytes()[:512])[0]


def test_decrypt_peak_is_plaintext_plus_about_one_chunk(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.sealed"
    with big_model.open("rb") as src, out.open("wb") as dst:
        encrypt_stream(src, dst, key=KEY, key_id="big", chunk_size=MIB)
    with out.open("rb") as f:
        tracemalloc.start()
        try:
            plain = decrypt_to_bytes(f, key=KEY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    size = 64 * MIB
    assert size <= peak < size + 2 * MIB, f"peak {peak / MIB:.2f} MiB for a 64 MiB model"
    assert type(plain) is bytes
    assert hashlib.sha256(plain).digest() == hashlib.sha256(big_model.read_bytes()).digest()


def test_large_file_tamper_refused_on_the_threaded_path() -> None:
    # >= 64 KiB and > 2 chunks: the in-place bytes buffer and the hashing thread.
    plain = os.urandom(300_000)
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, key=KEY, key_id="m", chunk_size=16_384)
    blob = out.getvalue()
    assert decrypt_to_bytes(io.BytesIO(blob), key=KEY) == plain
    with pytest.raises(SealedFormatError, match="chunk 18 failed authentication"):
        decrypt_to_bytes(io.BytesIO(flip(blob, len(blob) - 20)), key=KEY)
    with pytest.raises(SealedFormatError, match="chunk 18 of 19 is cut short"):
        decrypt_to_bytes(io.BytesIO(blob[:-1]), key=KEY)
