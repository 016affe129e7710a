"""The one place where sealserve errors become HTTP statuses on the REST port.

The codes follow KServe's V2 REST API (400 for bad input, 404 for an unknown model,
503 when a dependency is missing, 500 for a server fault, an ``{"error": ...}`` body)
and HTTP's own meaning for the rest (401 with ``WWW-Authenticate``, 403, 429 with
``Retry-After``). The message is the one the gRPC port sends for the same error; an
unexpected exception becomes 500 with a generic message and an incident id, details
in the server log only.
"""

from __future__ import annotations

import logging
import math
import uuid

import orjson

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

log = logging.getLogger("sealserve.rest")

Headers = list[tuple[bytes, bytes]]

_CODES: tuple[tuple[type[SealserveError], int], ...] = (
    (NotFoundError, 404),
    (InputError, 400),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (SuspendedError, 403),
    # 428 Precondition Required: pay the proof of work named in the header, retry.
    (ChallengeRequiredError, 428),
    (RefusedError, 429),
    (OverloadedError, 503),
    (UnavailableError, 503),
    (AttestationError, 400),
    (KeyReleaseError, 403),
)


class HttpError(Exception):
    """A refusal the REST adapter itself decides (route, method, body framing)."""

    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def to_http(exc: BaseException) -> tuple[int, str, Headers]:
    """Map an exception to (HTTP status, client-facing message, extra headers)."""
    if isinstance(exc, HttpError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, SealserveError):
        for cls, status in _CODES:
            if isinstance(exc, cls):
                headers: Headers = []
                if isinstance(exc, OverloadedError):
                    headers.append((b"retry-after", b"1"))
                if isinstance(exc, RefusedError) and exc.retry_after is not None:
                    retry = max(1, math.ceil(exc.retry_after))
                    headers.append((b"retry-after", str(retry).encode()))
                if isinstance(exc, ChallengeRequiredError) and exc.challenge:
                    headers.append((b"sealserve-challenge", exc.challenge.encode()))
                if isinstance(exc, SuspendedError):
                    # 403 for any OIP client; the SDK raises SuspendedError.
                    headers.append((b"sealserve-refusal", b"suspended"))
                if status == 401:
                    headers.append((b"www-authenticate", b"Bearer"))
                return status, exc.message, headers
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return 500, f"internal error (incident {incident})", []


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
