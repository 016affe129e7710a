"""The gRPC side of authentication: a thin wrapper over ``sealserve.auth``.

Every RPC except health checking, reflection, ``GetEvidence`` and (when configured,
the default) OIP ``ServerLive``/``ServerReady`` needs a bearer token with the RPC's
scope. The verified :class:`Principal` is put in a context variable for the servicers
(``current_principal()``). A request body that does not parse is answered
INVALID_ARGUMENT with a fixed message, after authentication.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from sealserve.auth import Authenticator
from sealserve.auth.authenticator import KeyRefreshNeeded
from sealserve.auth.principal import (
    SCOPE_ADMIN,
    SCOPE_INFER,
    SCOPE_METADATA,
    Principal,
)
from sealserve.errors import AuthenticationError, ConfigError
from sealserve.rpc.status import abort
from sealserve.server.grpc.per_peer import PeerLog
from sealserve.server.metrics import Metrics

log = logging.getLogger("sealserve.auth")

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "sealserve_principal", default=None
)

# RPCs that need no token: a client must be able to check health and verify the
# server's attestation before it sends any credential.
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/sealserve.v1.Attestation/GetEvidence",
)

SCOPES: dict[str, str] = {
    "/inference.GRPCInferenceService/ModelInfer": SCOPE_INFER,
    "/inference.GRPCInferenceService/ServerLive": SCOPE_METADATA,
    "/inference.GRPCInferenceService/ServerReady": SCOPE_METADATA,
    "/inference.GRPCInferenceService/ModelReady": SCOPE_METADATA,
    "/inference.GRPCInferenceService/ServerMetadata": SCOPE_METADATA,
    "/inference.GRPCInferenceService/ModelMetadata": SCOPE_METADATA,
}
SERVICE_SCOPES: dict[str, str] = {
    "/sealserve.v1.Admin/": SCOPE_ADMIN,
}


#: A method's check on the request header alone (the principal is set), before its
#: body is read; it raises to refuse.
BeforeBody = Callable[[grpc.aio.ServicerContext], None]

UNDECODABLE_MESSAGE = (
    "the request body is not a valid protobuf message for this method; "
    "check that client and server use the same .proto"
)

# The OIP liveness and readiness RPCs: public like health when ``public_liveness``
# (OIP clients such as tritonclient and kserve probe them without a token).
LIVENESS_METHODS = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served (None when auth is disabled)."""
    return _PRINCIPAL.get()


def scope_for(method: str, *, public_liveness: bool = False) -> str | None:
    """The scope an RPC needs, or None for a public RPC. Unknown RPCs need admin."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    if public_liveness and method in LIVENESS_METHODS:
        return None
    scope = SCOPES.get(method)
    if scope is not None:
        return scope
    for prefix, s in SERVICE_SCOPES.items():
        if method.startswith(prefix):
            return s
    return SCOPE_ADMIN  # default deny: anything unlisted needs the strongest scope


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class Undecodable:
    """Stands in for a request whose body did not parse, so that the handler (after
    authentication) answers INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure: the handler answers it
            return Undecodable(len(data))

    return decode


class Authenticating(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Wraps a service's generic handler so each protected method checks the token,
    and each unary method answers an undecodable body with INVALID_ARGUMENT.

    This does what a server interceptor would, without grpc.aio's per-call interceptor
    machinery (which costs more than the check itself): the wrapped method handlers
    are built once per registered method and cached (an unknown method path is not
    cached: the client chooses it). ``authenticator`` None: no token checks.
    """

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        authenticator: Authenticator | None,
        metrics: Metrics,
        *,
        undecodable_log: PeerLog,
        public_liveness: bool = False,
        before_body: Mapping[str, BeforeBody] | None = None,
    ) -> None:
        self._inner = inner
        self._auth = authenticator
        self._refused = metrics.refusals
        self._undecodable_log = undecodable_log
        self._public_liveness = public_liveness
        self._before_body = dict(before_body or {})
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None or method in self._wrapped:
            return wrapped
        handler = self._inner.service(details)
        if handler is None:
            return None  # not ours; never remembered (bounded by registered methods)
        scope = None if self._auth is None else scope_for(
            method, public_liveness=self._public_liveness
        )  # fmt: skip
        if handler.unary_unary is not None and method in self._before_body:
            wrapped = self._wrap_lazy(handler, scope, self._before_body[method])
        elif handler.unary_unary is not None:
            wrapped = self._wrap(handler, scope)
        elif scope is None:
            wrapped = handler
        else:
            # Default deny: a protected streaming RPC would bypass the check below.
            log.error("refusing %s: protected streaming RPCs are not supported", method)
            wrapped = None
        self._wrapped[method] = wrapped
        return wrapped

    async def _principal(self, header: str | None, scope: str) -> Principal:
        assert self._auth is not None
        auth = self._auth
        try:
            return auth.authenticate(header, required_scope=scope, may_block=False)
        except KeyRefreshNeeded:
            # Fetching the issuer's keys may block: do it off the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, lambda: auth.authenticate(header, required_scope=scope)
            )

    async def _undecodable(self, request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        self._refused.labels("undecodable").inc()
        self._undecodable_log.warning(
            context.peer() or "", f"undecodable request body ({request.size} bytes)"
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)

    def _wrap(self, handler: grpc.RpcMethodHandler, scope: str | None) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        async def decoded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await self._undecodable(request, context)
            return await inner(request, context)

        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            assert scope is not None
            header = _authorization(context.invocation_metadata())
            try:
                principal = await self._principal(header, scope)
            except ConfigError as exc:
                await abort(context, exc)
                raise
            except Exception as exc:
                reason = "auth" if isinstance(exc, AuthenticationError) else "permission"
                self._refused.labels(reason).inc()
                await abort(context, exc)
                raise
            if isinstance(request, Undecodable):
                await self._undecodable(request, context)
            token = _PRINCIPAL.set(principal)
            try:
                return await inner(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            decoded if scope is None else authenticated,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _authenticate(self, context: grpc.aio.ServicerContext, scope: str) -> Principal:
        header = _authorization(context.invocation_metadata())
        try:
            return await self._principal(header, scope)
        except ConfigError as exc:
            await abort(context, exc)
            raise
        except Exception as exc:
            reason = "auth" if isinstance(exc, AuthenticationError) else "permission"
            self._refused.labels(reason).inc()
            await abort(context, exc)
            raise

    def _wrap_lazy(
        self, handler: grpc.RpcMethodHandler, scope: str | None, before_body: BeforeBody
    ) -> grpc.RpcMethodHandler:
        """A unary method served as stream-unary (the same on the wire), so that the
        token and ``before_body`` are checked before the request body is read."""
        inner = handler.unary_unary

        async def lazy(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = None if scope is None else await self._authenticate(context, scope)
            token = _PRINCIPAL.set(principal)
            try:
                try:
                    before_body(context)
                except Exception as exc:
                    await abort(context, exc)
                    raise
                request = await context.read()
                if request is grpc.aio.EOF:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
                if isinstance(request, Undecodable):
                    await self._undecodable(request, context)
                return await inner(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return grpc.stream_unary_rpc_method_handler(
            lazy,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class AuthenticatingRegistrar:
    """Stands in for the server when a generated ``add_*Servicer_to_server`` registers a
    service: its handlers are registered wrapped in :class:`Authenticating`."""

    def __init__(
        self,
        server: Any,
        authenticator: Authenticator | None,
        metrics: Metrics,
        *,
        public_liveness: bool = False,
        before_body: Mapping[str, BeforeBody] | None = None,
    ) -> None:
        self._server = server
        self._auth = authenticator
        self._metrics = metrics
        self._public_liveness = public_liveness
        self._before_body = before_body
        self._undecodable_log = PeerLog(log)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(
                Authenticating(
                    h,
                    self._auth,
                    self._metrics,
                    undecodable_log=self._undecodable_log,
                    public_liveness=self._public_liveness,
                    before_body=self._before_body,
                )
                for h in handlers
            )
        )

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        # Newer generated code registers each service twice (generic and registered);
        # registered handlers would be found before the wrapped generic ones and skip
        # the checks, so only the generic registration above is kept.
        del service, handlers
