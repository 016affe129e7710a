"""Bearer-token verification: ``authorization`` header in, :class:`Principal` out.

Over 400 lines: one ordered token check, kept whole so the order is visible.

:meth:`Authenticator.authenticate` runs, in order:

1. Header: present, scheme ``Bearer``, token non-empty, within ``max_token_bytes``
   (checked before any parsing).
2. Verified-token cache (key: SHA-256 of the raw token). A hit re-checks exp/nbf/iat
   against the clock and that the signing key is still published unchanged.
3. On a miss, full verification with PyJWT: ``alg`` must be configured AND permitted by
   the type of the key that ``kid`` selects from the issuer named by ``iss``; then
   signature, ``iss``, ``aud``, required ``exp``/``iat``/``sub``/``jti``, time claims
   with leeway, tier and scope claims. ``jku``/``x5u``/``jwk``/``x5c`` are ignored.
4. Every call, cached or not: revoked ``jti`` (opaque), suspended account, terms of
   service version, required scope.

Client messages: failures of step 3 (and a revoked token) all carry the one opaque
:data:`INVALID_TOKEN_MESSAGE`; the header problems, suspension, terms and scope get
specific messages an honest client can act on. Every refusal carries ``log_detail``
for the server log and is logged at INFO on the ``sealserve.auth`` logger.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import jwt

from sealserve.auth.keys import JwksSource, attested_key_record, source_for_issuer_settings
from sealserve.auth.principal import SCOPE_ADMIN, SCOPES, Principal
from sealserve.auth.revocation import FileRevocationList, InMemoryRevocationList, RevocationList
from sealserve.auth.settings import AuthSettings
from sealserve.errors import (
    AuthenticationError,
    ConfigError,
    PermissionDeniedError,
    SuspendedError,
    quote,
)

logger = logging.getLogger("sealserve.auth")

INVALID_TOKEN_MESSAGE = "invalid or expired token"  # noqa: S105 (a message, not a secret)
MISSING_HEADER_MESSAGE = "missing credentials: send the metadata 'authorization: Bearer <token>'"
WRONG_SCHEME_MESSAGE = "unsupported authorization scheme: send 'authorization: Bearer <token>'"
EMPTY_TOKEN_MESSAGE = "empty bearer token: send 'authorization: Bearer <token>'"  # noqa: S105
SUSPENDED_MESSAGE = "account suspended: contact the model owner"

_INVALID_REMEDY = "Obtain a new token from your issuer and retry."
_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "sub", "jti"]


class KeyRefreshNeeded(AuthenticationError):
    """Internal signal: verifying this token may need a (blocking) JWKS fetch."""


def _invalid(detail: str) -> AuthenticationError:
    return AuthenticationError(INVALID_TOKEN_MESSAGE, log_detail=detail, remedy=_INVALID_REMEDY)


@dataclass(frozen=True)
class _Verified:
    """A verified token as the cache keeps it."""

    principal: Principal
    source: JwksSource
    kid: str
    fingerprint: str
    exp: float
    nbf: float | None
    iat: float
    cached_until: float


class _TokenCache:
    """A bounded, thread-safe LRU of verified tokens by SHA-256 of the raw token."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()

    def get(self, key: bytes) -> _Verified | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: _Verified) -> None:
        if self._max <= 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # NaN would pass every comparison (a token that never expires): finite numbers only.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"claim {name!r} is not a finite number")
    return float(value)


class Authenticator:
    """Verifies bearer tokens against the configured issuers and yields a Principal.

    Build it with :meth:`from_settings` (or inject ``sources`` by issuer name for
    tests), call :meth:`start` once (loads keys, starts background refreshers) and
    :meth:`close` at shutdown. Thread-safe: one instance serves every request.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        sources: Mapping[str, JwksSource],
        revocation: RevocationList | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        missing = {i.issuer for i in settings.issuers} - set(sources)
        if missing:
            raise ConfigError(f"no key source for issuer(s): {', '.join(sorted(missing))}")
        self.settings = settings
        self._sources = {i.issuer: sources[i.issuer] for i in settings.issuers}
        self.revocation: RevocationList = revocation or InMemoryRevocationList()
        self._clock = clock
        self._cache = _TokenCache(settings.cache_max_entries)
        self._algorithms = frozenset(settings.algorithms)
        # Issuer -> thumbprints that may sign `admin` tokens; pinned by start().
        self._admin_keys: dict[str, frozenset[str]] = {}

    @classmethod
    def from_settings(
        cls, settings: AuthSettings, *, revocation: RevocationList | None = None
    ) -> Authenticator:
        """Build key sources (and a file revocation list, if configured) from settings.

        Raises:
            ConfigError: a source or the revocation file is misconfigured.
        """
        sources = {
            i.issuer: source_for_issuer_settings(
                i,
                refresh=settings.jwks_refresh_seconds,
                min_refresh=settings.jwks_min_refresh_seconds,
                timeout=settings.jwks_fetch_timeout_seconds,
                max_stale=settings.jwks_max_stale_seconds,
            )
            for i in settings.issuers
        }
        if revocation is None and settings.revocation_file is not None:
            revocation = FileRevocationList(settings.revocation_file)
        return cls(settings, sources=sources, revocation=revocation)

    def start(self) -> None:
        """Load every issuer's keys and start background refreshes.

        Raises:
            ConfigError: a JWKS file is missing or holds no usable key. (An unreachable
            URL issuer is logged, not raised: its keys arrive when it comes back.)
        """
        for source in self._sources.values():
            source.start()
        # The keys admin tokens may be signed with: those held at start, which the
        # workload manifest records (attested_keys); a key added to the JWKS file later
        # verifies other scopes but never `admin`.
        self._admin_keys = {
            iss: frozenset(entry.get("thumbprints", ()))
            for iss, entry in attested_key_record(self._sources).items()
            if entry["admin"]
        }

    def attested_keys(self) -> dict[str, Any]:
        """The token-key record for the workload manifest (pinned at :meth:`start`)."""
        return {
            iss: (
                {**entry, "thumbprints": sorted(self._admin_keys.get(iss, ()))}
                if entry["admin"]
                else entry
            )
            for iss, entry in attested_key_record(self._sources).items()
        }

    def close(self) -> None:
        """Stop background refreshes. Idempotent."""
        for source in self._sources.values():
            source.close()

    def __enter__(self) -> Authenticator:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def authenticate(
        self, authorization: str | None, *, required_scope: str, may_block: bool = True
    ) -> Principal:
        """Verify the ``authorization`` header value and check ``required_scope``.

        Raises:
            AuthenticationError: no usable token (``message`` is client-safe,
                ``log_detail`` is for the server log).
            PermissionDeniedError: valid token, but terms not accepted or scope missing.
            SuspendedError: the revocation list suspends the account.
            UnavailableError: the revocation list cannot be read (fail closed).
            ConfigError: ``required_scope`` is not a known scope (a server bug).
            KeyRefreshNeeded: only with ``may_block=False``: the token names a key id
                that is not cached, and fetching the issuer's JWKS could block. Call
                again with ``may_block=True`` off the event loop.
        """
        return self.authenticate_at_time(
            authorization, required_scope=required_scope, now=self._clock(), may_block=may_block
        )

    def authenticate_at_time(
        self,
        authorization: str | None,
        *,
        required_scope: str,
        now: float,
        may_block: bool = True,
    ) -> Principal:
        """:meth:`authenticate` with the wall clock (seconds since the epoch) given."""
        if required_scope not in SCOPES:
            raise ConfigError(f"unknown scope {required_scope!r}")
        try:
            token = self._token_from_header(authorization)
            principal = self._principal_at_time(token, now, may_block)
            self._authorize(principal, required_scope)
        except KeyRefreshNeeded:
            raise
        except (AuthenticationError, PermissionDeniedError) as exc:
            logger.info("auth refused (%s): %s", type(exc).__name__, exc.log_detail)
            raise
        return principal

    def _token_from_header(self, authorization: str | None) -> str:
        limit = self.settings.max_token_bytes
        if authorization is None or not authorization.strip():
            raise AuthenticationError(MISSING_HEADER_MESSAGE, log_detail="no authorization header")
        if len(authorization) > limit + 64:
            raise self._too_large(len(authorization))
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError(
                WRONG_SCHEME_MESSAGE, log_detail="authorization scheme is not Bearer"
            )
        token = token.strip()
        if not token:
            raise AuthenticationError(EMPTY_TOKEN_MESSAGE, log_detail="empty bearer token")
        if len(token) > limit:
            raise self._too_large(len(token))
        if not token.isascii():
            raise _invalid("token has non-ASCII characters")
        return token

    def _too_large(self, size: int) -> AuthenticationError:
        limit = self.settings.max_token_bytes
        return AuthenticationError(
            f"token too large: at most {limit} bytes are accepted",
            log_detail=f"token of {size} bytes exceeds the {limit}-byte limit",
        )

    def _principal_at_time(self, token: str, now: float, may_block: bool = True) -> Principal:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            key = entry.source.get(entry.kid)
            if (
                now < entry.cached_until
                and key is not None
                and key.fingerprint == entry.fingerprint
            ):
                self._check_times(entry.exp, entry.nbf, entry.iat, now)
                return entry.principal
            self._cache.discard(digest)
        verified = self._verify(token, now, may_block)
        self._cache.put(digest, verified)
        return verified.principal

    def _check_times(self, exp: float, nbf: float | None, iat: float, now: float) -> None:
        # RFC 7519 4.1.4/4.1.5/4.1.6, with the configured leeway for clock skew.
        leeway = self.settings.leeway_seconds
        if exp <= now - leeway:
            raise _invalid(f"token expired at {exp:.0f} (now {now:.0f})")
        if nbf is not None and nbf > now + leeway:
            raise _invalid(f"token not valid before {nbf:.0f} (now {now:.0f})")
        if iat > now + leeway:
            raise _invalid(f"token issued in the future at {iat:.0f} (now {now:.0f})")

    def _verify(self, token: str, now: float, may_block: bool = True) -> _Verified:
        try:
            # Only to pick the issuer's key; every claim is verified below. One parse
            # for header and payload: PyJWT's base64 checks dominate a cold verify.
            parsed = jwt.decode_complete(token, options={"verify_signature": False})
            header, unverified = parsed["header"], parsed["payload"]
            if not isinstance(header, dict) or not isinstance(unverified, dict):
                raise TypeError("header or payload is not a JSON object")
        except Exception as exc:  # PyJWT on hostile input: any failure is "invalid"
            raise _invalid(f"malformed token: {type(exc).__name__}: {quote(str(exc))}") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid(f"algorithm {quote(str(alg))} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid("token header has no 'kid'")
        iss = unverified.get("iss")
        source = self._sources.get(iss) if isinstance(iss, str) else None
        if source is None:
            raise _invalid(f"issuer {quote(str(iss))} is not trusted")
        assert isinstance(iss, str)
        key = source.get(kid)
        if key is None and not may_block:
            raise KeyRefreshNeeded(INVALID_TOKEN_MESSAGE, log_detail=f"kid {quote(kid)} not cached")
        if key is None:
            source.refresh_for_unknown_kid()
            key = source.get(kid)
        if key is None:
            raise _invalid(f"kid {quote(kid)} is not in the JWKS of {quote(iss)}")
        if alg not in key.algorithms:
            raise _invalid(
                f"alg {quote(alg)} does not match key {quote(kid)} "
                f"(allows {sorted(key.algorithms)})"
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=iss,
                options={
                    "require": _REQUIRED_CLAIMS,
                    # Times are checked below against the injected clock, the same
                    # check a cache hit repeats.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except Exception as exc:  # see above
            raise _invalid(f"verification failed: {type(exc).__name__}: {quote(str(exc))}") from exc
        exp = _numeric(claims, "exp")
        iat = _numeric(claims, "iat")
        nbf = _numeric(claims, "nbf")
        assert exp is not None and iat is not None  # required above
        self._check_times(exp, nbf, iat, now)
        principal = self._principal_from_claims(claims, iss, exp, key.fingerprint)
        cached_until = min(
            exp + self.settings.leeway_seconds, now + self.settings.cache_ttl_seconds
        )
        return _Verified(principal, source, kid, key.fingerprint, exp, nbf, iat, cached_until)

    def _principal_from_claims(
        self, claims: Mapping[str, Any], iss: str, exp: float, thumbprint: str
    ) -> Principal:
        s = self.settings
        sub, jti = claims.get("sub"), claims.get("jti")
        if not isinstance(sub, str) or not sub:
            raise _invalid("claim 'sub' is empty or not a string")
        if not isinstance(jti, str) or not jti:
            raise _invalid("claim 'jti' is empty or not a string")
        tier = claims.get(s.tier_claim, s.default_tier)
        if not isinstance(tier, str) or not tier:
            raise _invalid(f"claim {s.tier_claim!r} is missing or not a string")
        if s.allowed_tiers is not None and tier not in s.allowed_tiers:
            raise _invalid(f"tier {quote(tier)} is not configured")
        scope = claims.get(s.scope_claim, "")
        if not isinstance(scope, str):
            raise _invalid(f"claim {s.scope_claim!r} is not a space-separated string")
        tos = claims.get(s.tos_claim)
        return Principal(
            account=sub,
            tier=tier,
            scopes=frozenset(scope.split()),
            tos_version=tos if isinstance(tos, str) else "",
            token_id=jti,
            expires_at=exp,
            issuer=iss,
            key_thumbprint=thumbprint,
        )

    def _authorize(self, principal: Principal, required_scope: str) -> None:
        if self.revocation.is_revoked(principal.token_id):
            raise _invalid(f"token id {quote(principal.token_id)} is revoked")
        if self.revocation.is_suspended(principal.account):
            # The same refusal as a suspension by the defense layer (SuspendedError),
            # so that clients handle one error for "this account is suspended".
            logger.info("auth refused (SuspendedError): account %s", quote(principal.account))
            raise SuspendedError(SUSPENDED_MESSAGE)
        required = self.settings.required_tos_version
        if principal.tos_version != required:
            if principal.tos_version:
                message = (
                    f"token records terms of service version {quote(principal.tos_version)} but "
                    f"version {required!r} is required: accept it and obtain a new token"
                )
            else:
                message = (
                    f"token does not record acceptance of the terms of service: "
                    f"accept version {required!r} and obtain a new token"
                )
            raise PermissionDeniedError(
                message,
                log_detail=f"account {quote(principal.account)} tos {quote(principal.tos_version)} "
                f"!= required {required!r}",
                remedy=f"Accept terms of service version {required} and obtain a new token.",
            )
        if required_scope not in principal.scopes:
            raise PermissionDeniedError(
                f"token lacks the {required_scope!r} scope this call requires",
                log_detail=f"account {quote(principal.account)} lacks scope {required_scope!r}",
                remedy=f"Ask the operator for a token with the {required_scope!r} scope.",
            )
        if required_scope == SCOPE_ADMIN and principal.key_thumbprint not in self._admin_keys.get(
            principal.issuer, frozenset()
        ):
            raise PermissionDeniedError(
                "the key that signed this token is not among the attested token keys: "
                "it may not use the 'admin' scope",
                log_detail=f"account {principal.account!r}: admin token signed by key "
                f"{principal.key_thumbprint!r} of {principal.issuer!r}, which is not in the "
                "set pinned at start (added later, or a jwks_url issuer)",
                remedy="Sign admin tokens with a key that was in the JWKS file when the "
                "server started (restart it to attest a new key).",
            )
