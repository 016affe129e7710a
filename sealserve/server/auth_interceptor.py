"""The gRPC side of authentication: a thin interceptor over ``sealserve.auth``.

Every RPC except health checking, reflection and ``GetEvidence`` needs a bearer token
with the RPC's scope. The verified :class:`Principal` is put in a context variable
for the servicers (``current_principal()``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from sealserve.auth import Authenticator
from sealserve.auth.authenticator import KeyRefreshNeeded
from sealserve.auth.principal import (
    SCOPE_ADMIN,
    SCOPE_AUDIT,
    SCOPE_INFER,
    SCOPE_METADATA,
    Principal,
)
from sealserve.errors import AuthenticationError, ConfigError
from sealserve.server.metrics import Metrics
from sealserve.server.status import abort

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
    "/sealserve.v1.Audit/": SCOPE_AUDIT,
}


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being served (None when auth is disabled)."""
    return _PRINCIPAL.get()


def scope_for(method: str) -> str | None:
    """The scope an RPC needs, or None for a public RPC. Unknown RPCs need admin."""
    if method.startswith(PUBLIC_PREFIXES):
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


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._auth = authenticator
        self._refused = metrics.refusals
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def _principal(self, header: str | None, scope: str) -> Principal:
        try:
            return self._auth.authenticate(header, required_scope=scope, may_block=False)
        except KeyRefreshNeeded:
            # Fetching the issuer's keys may block: do it off the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, lambda: self._auth.authenticate(header, required_scope=scope)
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        scope = scope_for(method)
        if handler is None or scope is None:
            return handler
        if handler.unary_unary is None:
            # Default deny: a protected streaming RPC would bypass the check below.
            log.error("refusing %s: protected streaming RPCs are not supported", method)
            return None
        wrapped = self._wrap(handler, scope)
        self._wrapped[method] = wrapped  # one wrapper per method, not per call
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, scope: str) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
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
            token = _PRINCIPAL.set(principal)
            try:
                return await inner(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            authenticated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
