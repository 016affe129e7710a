"""The SDK's HTTP side: the OIP REST API over one kept-alive connection (stdlib
``http.client``), tensors in the binary data extension, errors mapped back to the
sealserve error tree the way the server maps them (docs/rest.md).

TLS trusts exactly one certificate (the one attestation bound, or the caller's) and
checks the name the attested certificate carries, as the gRPC channel does.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote as urlquote

import numpy as np

from sealserve.client.quota import QUOTA_KEY, PowPaid, QuotaLeft
from sealserve.errors import (
    AuthenticationError,
    ChallengeRequiredError,
    InputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    SealserveError,
    SuspendedError,
    TensorError,
    UnavailableError,
)
from sealserve.tensors import (
    OIP_TO_NUMPY,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_to_oip,
)

HEADER_LENGTH = "Inference-Header-Content-Length"


def pinned_context(cert_pem: bytes) -> ssl.SSLContext:
    """A client SSLContext that trusts exactly ``cert_pem`` (self-signed server cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=cert_pem.decode())
    return ctx


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``host:port`` whose certificate is checked against ``server_name``
    (the attested name), not the host dialled."""

    def __init__(
        self, host: str, port: int, *, context: ssl.SSLContext, server_name: str, timeout: float
    ) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._pinned = context
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._pinned.wrap_socket(sock, server_hostname=self._server_name)


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UnavailableError(f"target {target[:64]!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class RestConnection:
    """One HTTP/1.1 connection to a sealserve REST port, reopened when it drops.

    ``context`` None: plaintext (``unsafe_plaintext``). Thread-safe (one call at a time).
    """

    def __init__(
        self,
        target: str,
        *,
        context: ssl.SSLContext | None,
        server_name: str = "localhost",
        timeout: float = 30.0,
    ) -> None:
        self._host, self._port = split_target(target)
        self._context = context
        self._server_name = server_name
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _open(self) -> http.client.HTTPConnection:
        if self._context is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return _PinnedHTTPSConnection(
            self._host, self._port, context=self._context, server_name=self._server_name,
            timeout=self._timeout,
        )  # fmt: skip

    def request(
        self, method: str, path: str, *, body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:  # fmt: skip
        """(status, headers, body). Raises UnavailableError when the server is unreachable."""
        with self._lock:
            for _ in range(2):
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = self._open()
                try:
                    self._conn.request(method, path, body=body, headers=dict(headers or {}))
                    resp = self._conn.getresponse()
                    data = resp.read()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    self.close_locked()
                    if not reused:
                        raise UnavailableError(
                            f"{self._host}:{self._port} closed the connection"
                        ) from None
                    continue  # a kept-alive connection the server timed out: reopen once
                except (OSError, http.client.HTTPException) as exc:
                    self.close_locked()
                    raise UnavailableError(
                        f"cannot reach {self._host}:{self._port}: {exc}"
                    ) from exc
                if resp.will_close:
                    self.close_locked()
                return resp.status, resp.headers, data
        raise AssertionError("unreachable")  # pragma: no cover

    def close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def from_http_error(status: int, headers: http.client.HTTPMessage, body: bytes) -> SealserveError:
    """An error response as the sealserve error the gRPC client would raise."""
    try:
        message = str(json.loads(body).get("error", "")) or f"HTTP {status}"
    except (ValueError, AttributeError):
        message = f"HTTP {status}: {body[:80]!r}"
    retry = headers.get("retry-after")
    retry_after = float(retry) if retry is not None and retry.isdigit() else None
    if status == 404:
        return NotFoundError(message)
    if status == 401:
        return AuthenticationError(message)
    if status == 403:
        if headers.get("sealserve-refusal") == "suspended":
            return SuspendedError(message, retry_after=retry_after)
        return PermissionDeniedError(message)
    if status == 428 and headers.get("sealserve-challenge"):
        return ChallengeRequiredError(message, challenge=str(headers["sealserve-challenge"]))
    if status == 429:
        return RateLimitedError(message, retry_after=retry_after)
    if status in (400, 408, 413, 415, 431):
        return InputError(message)
    if status in (502, 503, 504):
        return UnavailableError(message)
    return SealserveError(f"HTTP {status}: {message}")


def model_path(model: str, version: str = "") -> str:
    path = f"/v2/models/{urlquote(model, safe='')}"
    if version:
        path += f"/versions/{urlquote(version, safe='')}"
    return path


def encode_infer(
    inputs: Mapping[str, np.ndarray], *, outputs: Sequence[str] = (), request_id: str = ""
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request body and its headers (every tensor binary)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        datatype = numpy_to_oip(arr.dtype)
        blob = (
            encode_bytes_tensor(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
        )
        entries.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    doc: dict[str, Any] = {"inputs": entries, "parameters": {"binary_data_output": True}}
    if request_id:
        doc["id"] = request_id
    if outputs:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    header = json.dumps(doc, separators=(",", ":")).encode()
    return b"".join((header, *blobs)), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def decode_infer(headers: http.client.HTTPMessage, body: bytes) -> dict[str, np.ndarray]:
    """Outputs of a REST inference response (JSON data or binary extension)."""
    length = headers.get(HEADER_LENGTH)
    split = int(length) if length is not None and length.isdigit() else len(body)
    try:
        doc = json.loads(body[:split])
    except ValueError as exc:
        raise TensorError("the server's response is not valid JSON") from exc
    view = memoryview(body)[split:]
    offset = 0
    result: dict[str, np.ndarray] = {}
    for out in doc.get("outputs", []):
        name, datatype = out["name"], out["datatype"]
        shape = tuple(out["shape"])
        dtype = OIP_TO_NUMPY.get(datatype)
        if dtype is None:
            raise TensorError(f"output {name!r}: unknown datatype {datatype[:32]!r}")
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = bytes(view[offset : offset + size])
            offset += size
            if datatype == "BYTES":
                arr = decode_bytes_tensor(name, raw, math.prod(shape))
            else:
                arr = np.frombuffer(raw, dtype=dtype)
        elif datatype == "BYTES":
            arr = np.array([s.encode() for s in out["data"]], dtype=np.object_)
        else:
            arr = np.asarray(out["data"], dtype=dtype)
        result[name] = arr.reshape(shape)
    return result


class RestCalls:
    """What :class:`~sealserve.client.Client` does over HTTP (``protocol="http"``):
    bearer token per request, proof of work paid once when challenged."""

    def __init__(
        self,
        connection: RestConnection,
        *,
        token: Any,
        solve_challenges: bool,
    ) -> None:
        self._conn = connection
        self._token = token
        self.solve_challenges = solve_challenges
        self.pow_paid = PowPaid()
        self.quota: QuotaLeft | None = None

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        headers = dict(extra)
        if self._token is not None:
            value = self._token() if callable(self._token) else self._token
            headers["Authorization"] = f"Bearer {value}"
        return headers

    def call(
        self, method: str, path: str, *, body: bytes | None = None,
        headers: Mapping[str, str] | None = None, ok: tuple[int, ...] = (200,),
    ) -> tuple[int, http.client.HTTPMessage, bytes]:  # fmt: skip
        extra = dict(headers or {})
        status, got, data = self._conn.request(
            method, path, body=body, headers=self._headers(extra)
        )
        if status not in ok:
            error = from_http_error(status, got, data)
            if (
                self.solve_challenges
                and isinstance(error, ChallengeRequiredError)
                and error.challenge
            ):
                # The server wants proof of work with each call: pay it and retry once.
                extra["sealserve-pow-challenge"] = error.challenge
                extra["sealserve-pow-solution"] = self.pow_paid.pay(error.challenge)
                status, got, data = self._conn.request(
                    method, path, body=body, headers=self._headers(extra)
                )
                if status in ok:
                    return status, got, data
                error = from_http_error(status, got, data)
            raise error
        return status, got, data

    def server_ready(self) -> bool:
        return self.call("GET", "/v2/health/ready", ok=(200, 400))[0] == 200

    def model_ready(self, model: str, version: str = "") -> bool:
        return self.call("GET", model_path(model, version) + "/ready", ok=(200, 400))[0] == 200

    def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.call("GET", model_path(model, version))[2])
        return data

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
        outputs: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:  # fmt: skip
        body, headers = encode_infer(inputs, outputs=outputs)
        _, got, data = self.call(
            "POST", model_path(model, version) + "/infer", body=body, headers=headers
        )
        remaining = got.get(QUOTA_KEY)
        if remaining is not None:
            self.quota = QuotaLeft.from_header(remaining)
        return decode_infer(got, data)

    def close(self) -> None:
        self._conn.close()
