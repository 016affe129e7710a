"""The encrypted model file format (``.sealed``), version 1.

Over 400 lines: one file format, writer and reader, with streaming and zeroing.

A file is a header followed by the model as AES-256-GCM chunks (``cryptography``'s
``AESGCM``; nothing here is hand-written crypto). Byte layout (big-endian)::

    magic        8   b"SEALONNX"
    version      1   1
    key_id_len   2   1..256
    key_id       L   UTF-8, names the data key (broker or key file)
    chunk_size   4   plaintext bytes per chunk (the last chunk may be shorter)
    length       8   plaintext length, >= 1
    sha256      32   SHA-256 of the plaintext model
    salt        32   random per file
    commitment  32   key commitment, HKDF output (proves the key opens this file)
    header_mac  32   HMAC-SHA256 over every header byte before it
    chunks          ceil(length / chunk_size) x (ciphertext || 16-byte tag)

Per file, HKDF-SHA256(data key, salt) derives an AES key, a 4-byte nonce prefix, a MAC
key and the key commitment, so no (key, nonce) pair repeats across files that share a
data key. Chunk ``i`` uses nonce ``prefix || u64(i)`` and associated data
``SHA-256(header) || u64(i) || final_flag``. A chunk therefore only opens at its own
index, in its own file, with the right final flag: truncation, reordering, splicing,
header edits and bit flips all fail with a :class:`SealedFormatError` naming what failed.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import io
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealserve.errors import CryptoError, SealedFormatError, SealserveError

MAGIC = b"SEALONNX"
FORMAT_VERSION = 1
KEY_SIZE = 32
TAG_SIZE = 16
SALT_SIZE = 32
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_KEY_ID_BYTES = 256
MAX_CHUNKS = 2**32
_HKDF_INFO = b"sealserve model file v1"
_FIXED = struct.Struct(">IQ")  # chunk_size, length
T = TypeVar("T")

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in bytes of work; encryption does two passes (hash, encrypt)."""


def generate_key() -> bytes:
    """Return a fresh random 256-bit data key (the one key factory of this module)."""
    return AESGCM.generate_key(bit_length=256)


def check_key(key: bytes) -> bytes:
    """Return ``key`` if it is a 32-byte data key; raise :class:`CryptoError` otherwise."""
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise CryptoError(
            f"a model data key must be {KEY_SIZE} bytes, got {size}",
            remedy="Use the key made by generate_key() or read from the key file.",
        )
    return bytes(key)


def check_key_id(key_id: str, *, error: type[SealserveError] = CryptoError) -> str:
    """Return ``key_id`` if it is a usable key id (1..256 bytes of printable UTF-8), the
    one rule for model files, key files and the broker; raise ``error`` otherwise (the
    broker passes InputError: there the id is a client's input)."""
    raw = key_id.encode("utf-8", "replace") if isinstance(key_id, str) else b""
    if not 1 <= len(raw) <= MAX_KEY_ID_BYTES or not key_id.isprintable():
        shown = repr(key_id[:32]) if isinstance(key_id, str) else type(key_id).__name__
        raise error(
            f"key id must be 1..{MAX_KEY_ID_BYTES} bytes of printable UTF-8, got {shown} "
            f"({len(raw)} bytes)"
        )
    return key_id


@dataclass(frozen=True)
class ModelFileHeader:
    """The parsed header of an encrypted model file. Build with :meth:`from_stream`."""

    version: int
    key_id: str
    chunk_size: int
    plaintext_length: int
    plaintext_sha256: bytes
    salt: bytes
    commitment: bytes
    mac: bytes
    raw: bytes

    @property
    def chunk_count(self) -> int:
        return -(-self.plaintext_length // self.chunk_size)

    @property
    def ciphertext_length(self) -> int:
        """Length of the whole file: header plus every chunk with its tag."""
        return len(self.raw) + self.plaintext_length + TAG_SIZE * self.chunk_count

    @property
    def digest(self) -> bytes:
        """SHA-256 of the raw header bytes; every chunk's associated data starts with it."""
        return hashlib.sha256(self.raw).digest()

    @classmethod
    def from_stream(cls, f: BinaryIO) -> ModelFileHeader:
        """Read and parse a header, checking its structure (not its MAC: that needs the key).

        Raises :class:`SealedFormatError` for a wrong magic, an unknown version, a
        truncated header or out-of-range fields.
        """
        start = _read_exact(f, len(MAGIC) + 3, what="header")
        if start[: len(MAGIC)] != MAGIC:
            raise SealedFormatError("bad magic: not a sealserve encrypted model file")
        version = start[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise SealedFormatError(
                f"unsupported format version {version} (this sealserve reads {FORMAT_VERSION})"
            )
        (key_id_len,) = struct.unpack(">H", start[len(MAGIC) + 1 :])
        if not 1 <= key_id_len <= MAX_KEY_ID_BYTES:
            raise SealedFormatError(f"bad header: key id length {key_id_len} is out of range")
        rest = _read_exact(f, key_id_len + _FIXED.size + 32 + SALT_SIZE + 32 + 32, what="header")
        try:
            key_id = rest[:key_id_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SealedFormatError("bad header: key id is not UTF-8") from exc
        pos = key_id_len
        chunk_size, length = _FIXED.unpack_from(rest, pos)
        pos += _FIXED.size
        sha, salt, commitment, mac = (rest[pos + 32 * i : pos + 32 * (i + 1)] for i in range(4))
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise SealedFormatError(f"bad header: chunk size {chunk_size} is out of range")
        if length < 1 or -(-length // chunk_size) > MAX_CHUNKS:
            raise SealedFormatError(f"bad header: plaintext length {length} is out of range")
        return cls(
            version=version,
            key_id=key_id,
            chunk_size=chunk_size,
            plaintext_length=length,
            plaintext_sha256=sha,
            salt=salt,
            commitment=commitment,
            mac=mac,
            raw=start + rest,
        )


def read_header(f: BinaryIO) -> ModelFileHeader:
    """Read the header of an encrypted model file (to learn its key id, length, digest).

    Does not need the key and does not authenticate the header; decryption does.
    Raises :class:`SealedFormatError` as :meth:`ModelFileHeader.from_stream`.
    """
    return ModelFileHeader.from_stream(f)


@dataclass(frozen=True)
class _FileKeys:
    aead: AESGCM
    nonce_prefix: bytes
    mac_key: bytes
    commitment: bytes

    @classmethod
    def derive(cls, key: bytes, salt: bytes) -> _FileKeys:
        okm = HKDF(algorithm=hashes.SHA256(), length=100, salt=salt, info=_HKDF_INFO).derive(key)
        return cls(AESGCM(okm[:32]), okm[32:36], okm[36:68], okm[68:100])

    def nonce(self, index: int) -> bytes:
        return self.nonce_prefix + index.to_bytes(8, "big")

    def header_mac(self, header_without_mac: bytes) -> bytes:
        return hmac.new(self.mac_key, header_without_mac, hashlib.sha256).digest()


def _aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return header_digest + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


def _read_exact(f: BinaryIO, n: int, *, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SealedFormatError(f"file ends inside the {what} ({len(data)} of {n} bytes)")
    return data


def _readinto_full(f: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _plaintext_digest_and_length(
    src: BinaryIO, buf: bytearray, progress: Progress | None, total: int
) -> tuple[bytes, int]:
    h = hashlib.sha256()
    view = memoryview(buf)
    length = 0
    while n := _readinto_full(src, view):
        h.update(view[:n])
        length += n
        if progress:
            progress(min(length, total // 2), total)
    return h.digest(), length


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key: bytes,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> ModelFileHeader:
    """Encrypt the model read from ``src`` into ``dst`` and return the written header.

    ``src`` must be seekable: it is read twice, once for the SHA-256 the header
    carries, once to encrypt, and must not change in between. Memory stays at two
    chunks whatever the model size. Raises :class:`CryptoError` for a bad key, key id
    or chunk size, an empty model, or a model that changed while being encrypted.
    """
    key = check_key(key)
    key_id = check_key_id(key_id)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise CryptoError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    if not src.seekable():
        raise CryptoError("the model must be a seekable file (it is read twice)")
    start = src.tell()
    expected_total = 2 * (src.seek(0, os.SEEK_END) - start)
    src.seek(start)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    sha, length = _plaintext_digest_and_length(src, buf, progress, expected_total)
    if length == 0:
        raise CryptoError(
            "refusing to encrypt an empty model", remedy="Check the model path and its contents."
        )
    if -(-length // chunk_size) > MAX_CHUNKS:
        raise CryptoError("model too large for this chunk size; use a larger chunk size")
    total = 2 * length
    if progress:
        progress(length, total)

    salt = os.urandom(SALT_SIZE)
    keys = _FileKeys.derive(key, salt)
    kid = key_id.encode("utf-8")
    body = (
        MAGIC
        + bytes([FORMAT_VERSION])
        + struct.pack(">H", len(kid))
        + kid
        + _FIXED.pack(chunk_size, length)
        + sha
        + salt
        + keys.commitment
    )
    raw = body + keys.header_mac(body)
    header = ModelFileHeader.from_stream(io.BytesIO(raw))
    dst.write(raw)

    src.seek(start)
    out_view = memoryview(bytearray(chunk_size + TAG_SIZE))
    check = hashlib.sha256()
    try:
        _encrypt_chunks(src, dst, view, out_view, keys, header, check, progress)
    finally:
        _zero(view)
    if src.read(1) or not hmac.compare_digest(check.digest(), sha):
        raise CryptoError("the model changed while it was being encrypted")
    return header


def _encrypt_chunks(
    src: BinaryIO,
    dst: BinaryIO,
    view: memoryview,
    out_view: memoryview,
    keys: _FileKeys,
    header: ModelFileHeader,
    check: hashlib._Hash,
    progress: Progress | None,
) -> None:
    length, chunk_size = header.plaintext_length, header.chunk_size
    header_digest = header.digest
    done = 0
    for index in range(header.chunk_count):
        n = _readinto_full(src, view)
        final = index == header.chunk_count - 1
        expected = length - done if final else chunk_size
        if n != expected:
            raise CryptoError("the model changed while it was being encrypted")
        check.update(view[:n])
        keys.aead.encrypt_into(
            keys.nonce(index), view[:n], _aad(header_digest, index, final), out_view[: n + TAG_SIZE]
        )
        dst.write(out_view[: n + TAG_SIZE])
        done += n
        if progress:
            progress(length + done, 2 * length)


def _authenticate_header(header: ModelFileHeader, key: bytes) -> _FileKeys:
    keys = _FileKeys.derive(check_key(key), header.salt)
    if not hmac.compare_digest(keys.commitment, header.commitment):
        raise SealedFormatError(
            f"wrong key: this key does not open the file (it wants key id {header.key_id!r}), "
            "or the header's salt or key commitment was modified"
        )
    if not hmac.compare_digest(keys.header_mac(header.raw[:-32]), header.mac):
        raise SealedFormatError("header failed authentication: the header was modified")
    return keys


def _new_bytes(n: int) -> tuple[bytes, memoryview]:
    """A fresh ``bytes`` of ``n`` bytes plus a writable view of its storage.

    onnxruntime takes a model only as ``bytes``; decrypting into a bytearray and then
    copying would hold the plaintext twice. CPython's documented pattern
    ``PyBytes_FromStringAndSize(NULL, n)`` makes an unshared, uninitialised object that
    its creator fills before anyone else sees it; we fill it here before returning it.
    Other interpreters fall back to a bytearray (and a copy at the end).
    """
    if n >= _BIG and platform.python_implementation() == "CPython":
        obj: bytes = _bytes_from_string_and_size(None, n)
        address = _bytes_as_string(obj)
        _prefault(address, n)
        storage = (ctypes.c_char * n).from_address(address)
        return obj, memoryview(storage).cast("B")
    return b"", memoryview(bytearray(n))  # small: the final copy costs nothing


_BIG = 1 << 16
_MADV_POPULATE_WRITE = 23
_PAGE = 4096


def _prefault(address: int, n: int) -> None:
    """Fault in a fresh buffer with one madvise call instead of one fault per page.

    Worth ~10% of decryption time on a VM, where page faults are costly. Populating
    changes no page's contents, including the neighbours sharing the buffer's first and
    last pages. Linux >= 5.14; elsewhere, or on any error, pages fault in as written.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        start = address & ~(_PAGE - 1)
        madvise(start, address + n - start, _MADV_POPULATE_WRITE)
    except (OSError, AttributeError):
        pass


# Own prototypes (PYFUNCTYPE holds the GIL), so the shared ctypes.pythonapi is untouched.
_bytes_from_string_and_size = ctypes.PYFUNCTYPE(
    ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t
)(("PyBytes_FromStringAndSize", ctypes.pythonapi))
_bytes_as_string = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(
    ("PyBytes_AsString", ctypes.pythonapi)
)


class _Decryption:
    """Reads an encrypted model chunk by chunk, authenticating everything on the way."""

    def __init__(self, src: BinaryIO, key: bytes) -> None:
        key = check_key(key)
        self.src = src
        self.header = read_header(src)
        self.keys = _authenticate_header(self.header, key)
        self._digest = self.header.digest
        size = min(self.header.chunk_size, self.header.plaintext_length) + TAG_SIZE
        self._cview = memoryview(bytearray(size))

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """(index, plaintext offset, plaintext length) of every chunk, in order."""
        h = self.header
        for index in range(h.chunk_count):
            start = index * h.chunk_size
            yield index, start, min(h.chunk_size, h.plaintext_length - start)

    def open_chunk(self, index: int, target: memoryview) -> None:
        """Read chunk ``index`` and decrypt it into ``target`` (its plaintext length)."""
        n, count = len(target), self.header.chunk_count
        got = _readinto_full(self.src, self._cview[: n + TAG_SIZE])
        if got != n + TAG_SIZE:
            raise SealedFormatError(
                f"file ends before the final chunk (chunk {index} of {count} is "
                f"{'missing' if got == 0 else 'cut short'})"
            )
        try:
            self.keys.aead.decrypt_into(
                self.keys.nonce(index),
                self._cview[: n + TAG_SIZE],
                _aad(self._digest, index, index == count - 1),
                target,
            )
        except InvalidTag:
            raise SealedFormatError(
                f"chunk {index} failed authentication (modified, reordered or from another file)"
            ) from None

    def finish(self, digest: bytes, expected_sha256: bytes | None) -> None:
        """Check that the file ends here and that the plaintext digest is right."""
        if self.src.read(1):
            raise SealedFormatError("trailing data after the final chunk")
        if not hmac.compare_digest(digest, self.header.plaintext_sha256):
            raise SealedFormatError("plaintext SHA-256 does not match the header")
        if expected_sha256 is not None and not hmac.compare_digest(digest, expected_sha256):
            raise SealedFormatError(
                f"plaintext SHA-256 {digest.hex()} is not the expected {expected_sha256.hex()}"
            )


def decrypt_to_bytes(src: BinaryIO, *, key: bytes, expected_sha256: bytes | None = None) -> bytes:
    """Decrypt a whole encrypted model from ``src`` and return the plaintext.

    The plaintext buffer is allocated once from the header's length and each chunk is
    decrypted straight into it, so peak memory is the plaintext plus one chunk. The
    header is authenticated first, each chunk must authenticate at its index, the file
    must end exactly after the final chunk, and the plaintext's SHA-256 must equal the
    header's (and ``expected_sha256`` if given, e.g. the manifest's digest).

    Raises :class:`CryptoError` for a malformed key and :class:`SealedFormatError`
    naming what failed for a wrong key, a modified header, a chunk that fails
    authentication, a truncated file, trailing data or a digest mismatch. Nothing is
    returned unless every check passed.
    """
    dec = _Decryption(src, key)
    length = dec.header.plaintext_length
    result, plain = _new_bytes(length)
    # hashlib and AESGCM both release the GIL on large buffers: hashing chunk i on a
    # worker thread while chunk i+1 decrypts keeps the SHA-256 check off the critical
    # path. One worker runs its queue in order, so the digest sees chunks in order.
    hasher = ThreadPoolExecutor(1, "sealserve-sha256") if dec.header.chunk_count > 2 else None
    try:
        h = hashlib.sha256()
        for index, start, n in dec.spans():
            target = plain[start : start + n]
            dec.open_chunk(index, target)
            if hasher is None:
                h.update(target)
            else:
                hashed = hasher.submit(h.update, target)
        if hasher is not None:
            hasher.shutdown(wait=True)
            hashed.result()
        dec.finish(h.digest(), expected_sha256)
    except BaseException:
        if hasher is not None:
            hasher.shutdown(wait=True, cancel_futures=True)
        _zero(plain)
        raise
    return result if len(result) == length else bytes(plain)


def _failure_after(thread: threading.Thread, read_fd: int, failure: list[BaseException]) -> bool:
    """Close the read end (a writer still blocked fails with EPIPE), wait for the
    decryption thread, and say whether a decryption check failed."""
    os.close(read_fd)
    thread.join()
    return bool(failure)


def _zero(view: memoryview) -> None:
    """Overwrite a partly decrypted buffer so no unauthenticated plaintext lingers."""
    if len(view):
        ctypes.memset((ctypes.c_char * len(view)).from_buffer(view), 0, len(view))
