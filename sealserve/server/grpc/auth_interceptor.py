"""The gRPC side of authentication: a thin wrapper over ``sealserve.auth``.

Every RPC except health checking, reflection and ``GetEvidence`` needs a bearer token
with the RPC's scope. The verified :class:`Principal` is put in a context variable
for the servicers (``current_principal()``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
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


class Authenticating(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Wraps a service's generic handler so each protected method checks the token.

    This does what a server interceptor would, without grpc.aio's per-call interceptor
    machinery (which costs more than the check itself): the wrapped method handlers
    are built once per method and cached.
    """

    def __init__(
        self, inner: grpc.GenericRpcHandler, authenticator: Authenticator, metrics: Metrics
    ) -> None:
        self._inner = inner
        self._auth = authenticator
        self._refused = metrics.refusals
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(details)
        scope = scope_for(method)
        if handler is None or scope is None:
            wrapped = handler
        elif handler.unary_unary is None:
            # Default deny: a protected streaming RPC would bypass the check below.
            log.error("refusing %s: protected streaming RPCs are not supported", method)
            wrapped = None
        else:
            wrapped = self._wrap(handler, scope)
        self._wrapped[method] = wrapped
        return wrapped

    async def _principal(self, header: str | None, scope: str) -> Principal:
        try:
            return self._auth.authenticate(header, required_scope=scope, may_block=False)
        except KeyRefreshNeeded:
            # Fetching the issuer's keys may block: do it off the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, lambda: self._auth.authenticate(header, required_scope=scope)
            )

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


class AuthenticatingRegistrar:
    """Stands in for the server when a generated ``add_*Servicer_to_server`` registers a
    service: its handlers are registered wrapped in :class:`Authenticating`."""

    def __init__(self, server: Any, authenticator: Authenticator, metrics: Metrics) -> None:
        self._server = server
        self._auth = authenticator
        self._metrics = metrics

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(Authenticating(h, self._auth, self._metrics) for h in handlers)
        )
