"""The one exception tree of sealserve.

Every error the library raises derives from :class:`SealserveError`, which carries a
human-readable ``remedy``. The library raises; only the CLI exits. The mapping from
these classes to gRPC status codes lives in one place (``sealserve.rpc.status``)
and nowhere else: this module knows nothing of gRPC.

::

    SealserveError
    ├── ConfigError                  bad settings, policy or profile files
    ├── InputError                   a client sent something we cannot use
    │   ├── TensorError              wrong dtype / shape / size / names
    │   └── NotFoundError            unknown model or version
    ├── AuthError                    identity problems (opaque to the client)
    │   ├── AuthenticationError      no valid token
    │   └── PermissionDeniedError    valid token, not allowed
    ├── RefusedError                 the defense layer said no
    │   ├── RateLimitedError         rate or quota exhausted (``retry_after``)
    │   ├── ChallengeRequiredError   proof of work missing or wrong
    │   └── SuspendedError           account suspended
    ├── UnavailableError             a dependency (store, broker, model) is not there
    │   └── OverloadedError          a bounded queue is full
    ├── AttestationError             evidence could not be trusted
    │   ├── EvidenceFormatError      evidence could not be parsed
    │   ├── VerificationError        a cryptographic or chain check failed
    │   └── PolicyError              verified claims do not satisfy the policy
    ├── CryptoError                  sealed data could not be opened
    │   └── SealedFormatError        tampered, truncated or foreign sealed file
    ├── KeyReleaseError              the broker refused or failed to release a key
    └── AuditError                   an audit log failed verification or cannot be written
"""

from __future__ import annotations

from collections.abc import Sequence

#: How much of a client-chosen string or shape an error message or log line may quote.
QUOTE_CHARS = 64
QUOTE_DIMS = 8


def quote(value: object, *, limit: int = QUOTE_CHARS) -> str:
    """Client input for a message: ``'text'`` when short, else a prefix and the length.

    Every error or log line that repeats what a client sent goes through here (or
    :func:`quote_shape`), so that a huge name cannot make the error itself too large
    for the client's metadata limit or flood the log.
    """
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def quote_shape(shape: Sequence[int], *, limit: int = QUOTE_DIMS) -> str:
    """A client's shape for a message: whole up to ``limit`` dimensions, else a prefix."""
    dims = list(shape[:limit])
    if len(shape) <= limit:
        return str(dims)
    return f"[{', '.join(str(d) for d in dims)}, ...] ({len(shape)} dims)"


class SealserveError(Exception):
    """Base class of every sealserve error.

    ``remedy`` says, in one sentence, what the reader can do about it.
    """

    remedy: str = "See the sealserve documentation or the server log for details."

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(SealserveError):
    """Settings, a policy file or a defense profile is invalid."""

    remedy = "Fix the configuration named in the message and start again."


class InputError(SealserveError):
    """A request carried input the server cannot use."""

    remedy = "Check the request against the model's metadata (ModelMetadata)."


class TensorError(InputError):
    """A tensor's name, datatype, shape, size or contents is wrong."""


class NotFoundError(InputError):
    """The requested model or model version does not exist."""

    remedy = "List the served models with ServerMetadata/ModelMetadata."


class AuthError(SealserveError):
    """Identity problems. Clients see an opaque message; details go to the log.

    ``message`` is safe to send to the client. ``log_detail`` says which check failed
    and why, for the server's log only (it never holds the token itself).
    """

    def __init__(self, message: str, *, log_detail: str = "", remedy: str | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.log_detail = log_detail or message


class AuthenticationError(AuthError):
    """No valid credential was presented."""

    remedy = "Send 'authorization: Bearer <JWT>' with a current token from your issuer."


class PermissionDeniedError(AuthError):
    """The caller is known but not allowed to do this."""


class RefusedError(SealserveError):
    """The defense layer refused the request.

    ``retry_after`` is the number of seconds after which retrying may succeed, or
    ``None`` when waiting will not help.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, remedy: str | None = None
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after = retry_after


class RateLimitedError(RefusedError):
    """A rate limit or quota is exhausted."""

    remedy = "Wait for the time given in 'retry-after', or ask the operator for a higher tier."


class ChallengeRequiredError(RefusedError):
    """The account must solve a proof-of-work challenge with each call."""

    def __init__(
        self,
        message: str,
        *,
        challenge: str = "",
        retry_after: float | None = None,
        remedy: str | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, remedy=remedy)
        self.challenge = challenge


class SuspendedError(RefusedError):
    """The account is suspended."""

    remedy = "Contact the model owner."


class UnavailableError(SealserveError):
    """A dependency (state store, key broker, model) is not available right now.

    ``retry_after`` is a hint in seconds when one is known.
    """

    remedy = "Retry later; if it persists, the operator should check the server log."

    def __init__(
        self, message: str, *, retry_after: float | None = None, remedy: str | None = None
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after = retry_after


class OverloadedError(UnavailableError):
    """A bounded queue is full; the request was not queued."""

    remedy = "Retry with backoff or lower the request rate."


class AttestationError(SealserveError):
    """Attestation evidence could not be trusted.

    ``check`` names the check that failed (for example ``"report_signature"``).
    """

    remedy = "Do not send data to this endpoint; compare its evidence with your policy."

    def __init__(self, message: str, *, check: str = "", remedy: str | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.check = check


class EvidenceFormatError(AttestationError):
    """Evidence (report, quote, certificate chain, manifest) could not be parsed."""


class VerificationError(AttestationError):
    """A signature, certificate chain or binding check failed."""


class PolicyError(AttestationError):
    """Verified claims do not satisfy the relying party's policy."""


class CryptoError(SealserveError):
    """Encrypted or sealed data could not be opened."""


class SealedFormatError(CryptoError):
    """An encrypted file is tampered, truncated, spliced or not ours."""

    remedy = "Re-copy the file from the owner's original; never serve a file that fails this check."


class KeyReleaseError(SealserveError):
    """The key broker refused to release a key, or could not be reached."""


class AuditError(SealserveError):
    """An audit log failed verification (or could not be opened for appending).

    ``file``, ``line`` (1-based) and ``seq`` (the record's index in the chain) name the
    first bad record when there is one; ``problem`` says what is wrong with it.
    """

    remedy = (
        "Treat the log as tampered from the named record on; compare it with the "
        "owner's copy and the last signed checkpoint."
    )

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        line: int = 0,
        seq: int | None = None,
        problem: str = "",
        remedy: str | None = None,
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.file = file
        self.line = line
        self.seq = seq
        self.problem = problem
