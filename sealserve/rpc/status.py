"""The one place where sealserve errors become gRPC status codes (server and broker).

Known errors carry a message written for the client. Anything else becomes INTERNAL
with a generic message and an incident id; the details go to the server log only
(never ``str(err)``, unlike MLServer's adapter). :class:`~sealserve.errors.ConfigError`
is the operator's own configuration, not the client's fault: INTERNAL too. A service
that takes configuration *from* its client (the broker's admin policies) raises
:class:`~sealserve.errors.InputError` for it at its boundary.

Servicer methods are wrapped with :func:`grpc_errors` and contain no try/except.
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from sealserve.errors import (
    AttestationError,
    AuthenticationError,
    ChallengeRequiredError,
    InputError,
    KeyReleaseError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RefusedError,
    SealserveError,
    SuspendedError,
    UnavailableError,
)

log = logging.getLogger("sealserve.status")

Metadata = tuple[tuple[str, str], ...]
#: Trailing metadata (gRPC) and header (REST) naming a refusal that shares its status
#: code with others: ``suspended`` (PERMISSION_DENIED / 403).
REFUSAL_KEY = "sealserve-refusal"

_CODES: tuple[tuple[type[SealserveError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (SuspendedError, grpc.StatusCode.PERMISSION_DENIED),
    (ChallengeRequiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (RefusedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AttestationError, grpc.StatusCode.FAILED_PRECONDITION),
    (KeyReleaseError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``, without side effects (for metrics labels)."""
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, SealserveError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, Metadata]:
    """Map an exception to (code, client-facing message, trailing metadata)."""
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, (("retry-after", "1"),)
    if isinstance(exc, SealserveError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                meta: list[tuple[str, str]] = []
                if isinstance(exc, RefusedError | UnavailableError) and exc.retry_after:
                    meta.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
                if isinstance(exc, ChallengeRequiredError) and exc.challenge:
                    meta.append(("sealserve-challenge", exc.challenge))
                if isinstance(exc, SuspendedError):
                    # PERMISSION_DENIED for any OIP client; the SDK raises SuspendedError.
                    meta.append((REFUSAL_KEY, "suspended"))
                return code, exc.message, tuple(meta)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})", ()


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with the status for ``exc``. Never returns."""
    await abort_status(context, *to_status(exc))


async def abort_status(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, meta: Metadata
) -> None:
    """Abort the RPC with a status already computed by :func:`to_status`."""
    if meta:
        context.set_trailing_metadata(meta)
    await context.abort(code, message)


S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def grpc_errors(method: Method[S, Req, Resp]) -> Method[S, Req, Resp]:
    """Wrap an async unary servicer method: any exception it raises aborts the RPC
    with :func:`to_status`'s code and message (an abort the method made itself passes
    through unchanged)."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    return wrapper
