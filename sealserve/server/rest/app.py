"""The OIP (KServe V2) REST adapter: a bare ASGI application over the transport-free core.

Routes (KServe V2 REST API, plus one sealserve route)::

    GET  /v2                                        server metadata
    GET  /v2/health/live | /v2/health/ready         200 when true, 400 when not
    GET  /v2/models/M[/versions/V]                  model metadata
    GET  /v2/models/M[/versions/V]/ready            200 when ready, 400 when not
    POST /v2/models/M[/versions/V]/infer            inference (JSON or binary extension)
    GET  /v2/sealserve/evidence?nonce=HEX           attestation evidence (no token)

Every route but the evidence needs ``Authorization: Bearer <JWT>`` with the scope the
gRPC method needs (``metadata``, ``infer``). Proof of work travels in headers
(``sealserve-challenge`` out; ``sealserve-pow-challenge`` and ``sealserve-pow-solution``
in), quota left in ``sealserve-quota-remaining``. The body is refused before it is read
whole: ``Content-Length`` over the cap is 413 at once, a chunked body is cut off at the
cap (slow headers and bodies are the connection's business: server.py).

Bare ASGI rather than a framework: see docs/rest.md (the measured cost per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from sealserve.auth import Authenticator
from sealserve.auth.authenticator import KeyRefreshNeeded
from sealserve.auth.principal import SCOPE_INFER, SCOPE_METADATA, Principal
from sealserve.defense.guard import ProofOfWork
from sealserve.defense.store.base import Remaining
from sealserve.errors import AuthenticationError, ConfigError, InputError
from sealserve.server.dataplane import DataPlane
from sealserve.server.engine import LoadedModel
from sealserve.server.metrics import Metrics
from sealserve.server.rest.codec import (
    decode_infer_request,
    encode_infer_response,
    model_metadata,
    quote,
)
from sealserve.server.rest.errors import Headers, HttpError, error_body, to_http

log = logging.getLogger("sealserve.rest")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROTOCOL = "rest"
JSON = b"application/json"
OCTETS = b"application/octet-stream"
# The JSON header of an inference request without tensors is small; this is slack
# on top of the tensor limit for the JSON around binary data.
_ENVELOPE = 1 << 20


class RestApp:
    """The ASGI application. Built once by the composition root.

    ``evidence``: the attestation service's ``evidence(nonce) -> bytes`` (None: no
    attestation on this server, the route answers 404). ``max_json_bytes`` caps the
    JSON part of a request (a JSON number costs ~30 bytes of memory once parsed).
    """

    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        *,
        authenticator: Authenticator | None,
        evidence: Callable[[bytes], bytes] | None = None,
        evidence_rate: Callable[[str], None] | None = None,
        max_json_bytes: int = 8 << 20,
    ) -> None:
        self._plane = plane
        self._metrics = metrics
        self._auth = authenticator
        self._evidence = evidence
        self._evidence_rate = evidence_rate
        self._max_json = max_json_bytes
        self._max_body = max(plane.max_request_bytes, max_json_bytes) + _ENVELOPE
        self._ok: dict[LoadedModel, tuple[Any, Any]] = {}
        # Parsed paths of served models' infer routes (``_route`` fills it).
        self._infer_routes: dict[str, tuple[str, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        # A repeated header keeps its last value (none of ours may repeat).
        headers: dict[bytes, bytes] = dict(scope["headers"])
        try:
            route = self._infer_routes.get(scope["path"]) if scope["method"] == "POST" else None
            if route is not None:
                status, body, extra = await self._infer(*route, scope, headers, receive)
            else:
                status, body, extra = await self._route(scope, headers, receive)
        except Exception as exc:
            status, message, extra = to_http(exc)
            body = error_body(message)
            extra = [(b"content-type", JSON), *extra]
        if _BODY_READ not in scope and _has_body(headers):
            # Answered before the body was read (refused early): do not drain it.
            extra = [*extra, (b"connection", b"close")]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _route(
        self, scope: Scope, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[int, bytes, Headers]:
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            raise HttpError(404, f"no such route: {quote(path)}")
        rest = parts[1:]
        if rest and rest[0] == "models" and len(rest) >= 2:
            model, version, tail = _model_route(rest[1:], path)
            if tail == "infer":
                _method(method, "POST", path)
                if path == _infer_path(model, version) and self._plane.engine.ready(model, version):
                    # Only served models' canonical paths: client strings must not grow it.
                    self._infer_routes[path] = (model, version)
                return await self._infer(model, version, scope, headers, receive)
            _method(method, "GET", path)
            await self._authenticate(headers, SCOPE_METADATA)
            if tail == "ready":
                return _boolean("ready", self._plane.model_ready(model, version))
            return 200, model_metadata(self._plane.model_metadata(model, version)), _JSON
        if rest == ["sealserve", "evidence"]:
            _method(method, "GET", path)
            return await self._get_evidence(scope)
        _method(method, "GET", path)
        if rest == []:
            await self._authenticate(headers, SCOPE_METADATA)
            name, version, extensions = self._plane.server_metadata()
            doc = {"name": name, "version": version, "extensions": list(extensions)}
            return 200, orjson.dumps(doc), _JSON
        if rest == ["health", "live"]:
            await self._authenticate(headers, SCOPE_METADATA)
            return _boolean("live", self._plane.live())
        if rest == ["health", "ready"]:
            await self._authenticate(headers, SCOPE_METADATA)
            return _boolean("ready", self._plane.ready())
        raise HttpError(404, f"no such route: {quote(path)}")

    async def _authenticate(self, headers: dict[bytes, bytes], scope: str) -> Principal | None:
        if self._auth is None:
            return None
        raw = headers.get(b"authorization")
        header = raw.decode("latin-1") if raw is not None else None
        try:
            try:
                return self._auth.authenticate(header, required_scope=scope, may_block=False)
            except KeyRefreshNeeded:
                # Fetching the issuer's keys may block: do it off the event loop.
                loop = asyncio.get_running_loop()
                auth = self._auth
                return await loop.run_in_executor(
                    None, lambda: auth.authenticate(header, required_scope=scope)
                )
        except ConfigError:
            raise
        except Exception as exc:
            reason = "auth" if isinstance(exc, AuthenticationError) else "permission"
            self._metrics.refusals.labels(reason).inc()
            raise

    async def _infer(
        self, model: str, version: str, scope: Scope, headers: dict[bytes, bytes],
        receive: Receive,
    ) -> tuple[int, bytes, Headers]:  # fmt: skip
        # Every request of the REST port runs this: kept to the calls it needs.
        t0 = time.perf_counter()
        loaded = None
        try:
            principal = (
                await self._authenticate(headers, SCOPE_INFER) if self._auth is not None else None
            )
            loaded = self._plane.model(model, version)
            encoding = headers.get(b"content-encoding")
            if encoding is not None and encoding != b"identity":
                raise HttpError(
                    415,
                    f"Content-Encoding {quote(encoding.decode('latin-1'))} is not accepted; "
                    "send the body uncompressed",
                )
            # The body: read inline when it comes in one message (the usual case).
            declared = headers.get(b"content-length")
            if declared is not None:
                self._check_length(declared)
            first = await receive()
            body = first.get("body", b"")
            if (
                first["type"] == "http.request"
                and not first.get("more_body", False)
                and len(body) <= self._max_body
            ):
                scope[_BODY_READ] = True
            else:
                body = await self._read_body(scope, first, receive)
            length = headers.get(b"inference-header-content-length")
            decoded = decode_infer_request(
                body,
                loaded.info,
                header_length=None if length is None else _header_length(length),
                max_bytes=self._plane.max_request_bytes,
                max_json_bytes=self._max_json,
            )
            client = scope.get("client")
            forwarded = headers.get(b"x-forwarded-for")
            caller = self._plane.guard.caller(
                account=principal.account if principal else None,
                tier=principal.tier if principal else None,
                # The address alone: per-peer limits count hosts, and the guard caches
                # resolved peers by it.
                transport_peer=client[0] if client else "",
                forwarded_for=forwarded.decode("latin-1") if forwarded is not None else None,
                protocol=PROTOCOL,
            )
            # Nothing to admit (no limits, no defenses) and an inline model: answered
            # without a coroutine; otherwise admitted (proof of work included) first.
            result = self._plane.infer_now(decoded.request)
            if result is not None:
                remaining: tuple[Remaining, ...] = ()
            else:
                pow_ = None
                challenge = headers.get(b"sealserve-pow-challenge")
                if challenge is not None:
                    solution = headers.get(b"sealserve-pow-solution", b"")
                    pow_ = ProofOfWork(challenge.decode("latin-1"), solution.decode("latin-1"))
                result, remaining = await self._plane.infer(decoded.request, caller, pow_=pow_)
            body, header_length = encode_infer_response(
                result, binary_outputs=decoded.binary_outputs, all_binary=decoded.all_binary
            )
        except Exception as exc:
            status, message, extra = to_http(exc)  # logs an internal error, once
            # Metric labels only name served models (client strings would grow them).
            label = (loaded.info.name, loaded.info.version) if loaded else ("(unknown)", "")
            self._metrics.requests.labels(*label, str(status), PROTOCOL).inc()
            raise HttpError(status, message, extra) from exc
        out: Headers
        if header_length is None:
            out = [(b"content-type", JSON)]
        else:
            out = [
                (b"content-type", OCTETS),
                (b"inference-header-content-length", str(header_length).encode()),
            ]
        if remaining:
            quota = ",".join(f"{r.name}={r.remaining}/{r.limit}" for r in remaining)
            out.append((b"sealserve-quota-remaining", quota.encode()))
        ok, latency = self._ok_metrics(loaded)
        ok.inc()
        latency.observe(time.perf_counter() - t0)
        return 200, body, out

    def _ok_metrics(self, loaded: LoadedModel) -> tuple[Any, Any]:
        pair = self._ok.get(loaded)
        if pair is None:
            model, version = loaded.info.name, loaded.info.version
            pair = (
                self._metrics.requests.labels(model, version, "200", PROTOCOL),
                self._metrics.latency.labels(model, version, PROTOCOL),
            )
            self._ok[loaded] = pair
        return pair

    def _check_length(self, declared: bytes) -> None:
        """Refuse (413) a declared body over the cap before reading any of it."""
        if not declared.isdigit():
            raise HttpError(400, "Content-Length is not a number")
        if int(declared) > self._max_body:
            raise HttpError(
                413, f"request body of {int(declared)} bytes is over the limit of "
                f"{self._max_body} bytes"
            )  # fmt: skip

    async def _read_body(self, scope: Scope, message: Message, receive: Receive) -> bytes:
        """The whole body from its first message on, refused (413) as soon as it runs
        over the cap (a chunked body declares no length). The body's deadline is the
        connection's (server.py: 408, then close)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client went away before the body was sent")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise HttpError(413, f"request body is over the limit of {self._max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
            message = await receive()
        scope[_BODY_READ] = True
        return b"".join(chunks)

    async def _get_evidence(self, scope: Scope) -> tuple[int, bytes, Headers]:
        if self._evidence is None:
            raise HttpError(404, "this server serves no attestation evidence")
        if self._evidence_rate is not None:
            # The same per-address allowance as GetEvidence on the gRPC port.
            client = scope.get("client")
            host = client[0] if client else ""
            self._evidence_rate(f"ipv6:[{host}]:0" if ":" in host else f"ipv4:{host}:0")
        query = scope.get("query_string", b"").decode("latin-1")
        nonce_hex = ""
        for pair in query.split("&"):
            key, _, value = pair.partition("=")
            if key == "nonce":
                nonce_hex = value
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            raise InputError(f"nonce {quote(nonce_hex)} is not hexadecimal") from None
        loop = asyncio.get_running_loop()
        # A real platform's report goes through the kernel: keep it off the loop.
        data = await loop.run_in_executor(None, self._evidence, nonce)
        return 200, data, [(b"content-type", OCTETS)]


_JSON: Headers = [(b"content-type", JSON)]
_BODY_READ = "sealserve.body_read"


def _infer_path(model: str, version: str) -> str:
    if version:
        return f"/v2/models/{model}/versions/{version}/infer"
    return f"/v2/models/{model}/infer"


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _boolean(key: str, value: bool) -> tuple[int, bytes, Headers]:
    # KServe V2: health and readiness are the status code (200 true, 4xx false).
    return (200 if value else 400), orjson.dumps({key: value}), _JSON


def _method(got: str, want: str, path: str) -> None:
    if got != want and not (want == "GET" and got == "HEAD"):
        raise HttpError(
            405, f"{got} is not allowed on {quote(path)}; use {want}", [(b"allow", want.encode())]
        )


def _model_route(parts: list[str], path: str) -> tuple[str, str, str]:
    """(model, version, tail) for ``M``, ``M/ready``, ``M/infer``, ``M/versions/V[/...]``."""
    model, rest = parts[0], parts[1:]
    version = ""
    if rest[:1] == ["versions"] and len(rest) >= 2:
        version, rest = rest[1], rest[2:]
    if rest == []:
        return model, version, ""
    if rest in (["ready"], ["infer"]):
        return model, version, rest[0]
    raise HttpError(404, f"no such route: {quote(path)}")


def _header_length(value: bytes) -> int:
    """The ``Inference-Header-Content-Length`` header's value."""
    if not value.isdigit():
        raise HttpError(400, "Inference-Header-Content-Length is not a number")
    return int(value)
