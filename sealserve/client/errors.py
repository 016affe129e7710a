"""gRPC status -> the sealserve error tree, so SDK users catch one family of errors."""

from __future__ import annotations

import grpc

from sealserve.errors import (
    AuthenticationError,
    ChallengeRequiredError,
    InputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    SealserveError,
    SuspendedError,
    UnavailableError,
)


def from_rpc_error(exc: grpc.RpcError) -> SealserveError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    retry = trailing.get("retry-after")
    retry_after = float(retry) if isinstance(retry, str) and retry.isdigit() else None
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputError(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        if trailing.get("sealserve-refusal") == "suspended":
            return SuspendedError(details, retry_after=retry_after)
        return PermissionDeniedError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimitedError(details, retry_after=retry_after)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "sealserve-challenge" in trailing:
        return ChallengeRequiredError(details, challenge=str(trailing["sealserve-challenge"]))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(details)
    return SealserveError(f"{code.name if code else 'error'}: {details}")
