"""Issuer public keys: JWKS parsing, key-type/algorithm binding, and key sources.

Over 400 lines: JWKS parsing and its key sources share one refresh state machine.

A :class:`JwksSource` holds one issuer's current keys by ``kid``. Reads never block
and never fetch; :meth:`JwksSource.refresh_for_unknown_kid` is the only path from a
request to a fetch, and it is rate-limited per source. Two sources:

- :class:`FileJwksSource`: a JWKS JSON file, re-read when its mtime or size changes
  (checked at most once per ``check_interval``).
- :class:`UrlJwksSource`: a JWKS URL (or OIDC discovery), fetched with a timeout,
  refreshed by a background thread, served from cache while the issuer is down (up to
  ``max_stale`` seconds).

Headers that point at other keys (``jku``, ``x5u``, ``jwk``, ``x5c``) are never read
by this package: keys come only from the configured source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sealserve.auth.settings import SUPPORTED_ALGORITHMS, IssuerSettings, check_fetch_url
from sealserve.canonical import canonical_json
from sealserve.errors import ConfigError, UnavailableError

logger = logging.getLogger("sealserve.auth")

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1024 * 1024

Clock = Callable[[], float]


@dataclass(frozen=True)
class VerificationKey:
    """One usable public key from a JWKS.

    ``algorithms`` are the algorithms this key's type permits (and, when the JWK names
    an ``alg``, only that one): RSA -> RS*/PS*, EC P-256 -> ES256, P-384 -> ES384,
    P-521 -> ES512, OKP Ed25519 -> EdDSA. ``fingerprint`` is the RFC 7638 thumbprint;
    a cached verification is valid only while its key is still published unchanged.
    """

    kid: str
    key: Any
    algorithms: frozenset[str]
    fingerprint: str


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 JWK thumbprint, base64url without padding.

    Raises:
        ConfigError: the JWK lacks a member the thumbprint needs.
    """
    # RFC 7638 section 3.2: the required members only, lexicographic order, no spaces.
    required = {
        "RSA": ("e", "kty", "n"),
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
    }
    kty = jwk.get("kty")
    if kty not in required:
        raise ConfigError(f"cannot thumbprint a JWK of type {kty!r}")
    try:
        members = {name: jwk[name] for name in required[kty]}
    except KeyError as exc:
        raise ConfigError(f"JWK is missing member {exc.args[0]!r}") from exc
    digest = hashlib.sha256(canonical_json(members)).digest()
    return jwt.utils.base64url_encode(digest).decode()


def allowed_algorithms_for(key: Any) -> frozenset[str]:
    """The signature algorithms a public key's type permits (empty when none do)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS if key.key_size >= MIN_RSA_BITS else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def parse_jwks(document: Mapping[str, Any], *, origin: str) -> dict[str, VerificationKey]:
    """Turn a JWKS document into usable keys by ``kid``.

    Keys without a ``kid``, symmetric (``oct``) keys, keys whose ``use`` is not
    ``sig``, keys whose ``key_ops`` exclude ``verify``, unsupported curves and RSA
    keys under 2048 bits are skipped with a warning; one bad key does not spoil the
    set.

    Raises:
        ConfigError: the document is not a JWKS (no ``keys`` list).
    """
    keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(keys, list):
        raise ConfigError(f"{origin}: not a JWKS (no 'keys' list)")
    parsed: dict[str, VerificationKey] = {}
    for entry in keys:
        problem = _parse_one(entry, parsed)
        if problem:
            logger.warning("%s: skipping a JWK: %s", origin, problem)
    return parsed


def _parse_one(entry: Any, into: dict[str, VerificationKey]) -> str:
    if not isinstance(entry, dict):
        return "not a JSON object"
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return "no 'kid'"
    kty = entry.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        return f"kid {kid!r}: key type {kty!r} is not an asymmetric signing key"
    if entry.get("use", "sig") != "sig":
        return f"kid {kid!r}: 'use' is not 'sig'"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return f"kid {kid!r}: 'key_ops' does not allow 'verify'"
    if any(private in entry for private in ("d", "p", "q", "dp", "dq", "qi")):
        return f"kid {kid!r}: the JWKS holds a private key; refusing it"
    if kid in into:
        return f"kid {kid!r}: duplicate kid"
    declared = entry.get("alg")
    if declared is not None and declared not in SUPPORTED_ALGORITHMS:
        return f"kid {kid!r}: no acceptable algorithm for this key (alg={declared!r})"
    try:
        # PyJWK builds the key for the declared alg, so a mismatched alg fails here.
        jwk = jwt.PyJWK.from_dict(entry)
        fingerprint = jwk_thumbprint(entry)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ConfigError, ValueError, TypeError) as exc:
        return f"kid {kid!r}: {exc}"
    algorithms = allowed_algorithms_for(jwk.key)
    if declared is not None:
        algorithms = algorithms & {declared}
    algorithms &= SUPPORTED_ALGORITHMS
    if not algorithms:
        return f"kid {kid!r}: no acceptable algorithm for this key (alg={declared!r})"
    into[kid] = VerificationKey(kid, jwk.key, frozenset(algorithms), fingerprint)
    return ""


class JwksSource:
    """One issuer's keys by ``kid``; subclasses say how a JWKS document is loaded.

    ``get(kid)`` is cheap and never does I/O beyond what a subclass allows;
    ``refresh_for_unknown_kid()`` reloads at most once per ``min_refresh`` seconds.
    """

    def __init__(self, *, name: str, min_refresh: float, clock: Clock = time.monotonic) -> None:
        self.name = name
        self._min_refresh = min_refresh
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._refresh_lock = threading.Lock()
        self._last_attempt: float | None = None
        self.fetch_count = 0

    def get(self, kid: str) -> VerificationKey | None:
        """The current key for ``kid``, or ``None``."""
        return self._keys.get(kid)

    def thumbprints(self) -> frozenset[str]:
        """RFC 7638 thumbprints of the keys held now."""
        return frozenset(k.fingerprint for k in self._keys.values())

    def kids(self) -> frozenset[str]:
        """The ``kid`` of every current key."""
        return frozenset(self._keys)

    def refresh_for_unknown_kid(self) -> None:
        """Reload once if the last attempt is older than ``min_refresh``; else do nothing.

        Never raises: a failed reload is logged and the cached keys stay.
        """
        # Waiting on a refresh another thread is doing is bounded by the fetch timeout.
        with self._refresh_lock:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refresh:
                return
            self._reload_locked(now)

    def refresh_now(self) -> bool:
        """Reload now regardless of rate limits; True on success. Never raises."""
        with self._refresh_lock:
            return self._reload_locked(self._clock())

    def _reload_locked(self, now: float) -> bool:
        self._last_attempt = now
        self.fetch_count += 1
        try:
            document = self._load()
            keys = parse_jwks(document, origin=self.name)
        except (UnavailableError, ConfigError) as exc:
            logger.warning(
                "JWKS %s: reload failed, keeping %d cached keys: %s",
                self.name,
                len(self._keys),
                exc.message,
            )
            return False
        if {k: v.fingerprint for k, v in keys.items()} != {
            k: v.fingerprint for k, v in self._keys.items()
        }:
            logger.info("JWKS %s: now %d keys (%s)", self.name, len(keys), ", ".join(sorted(keys)))
        self._keys = keys  # atomic swap; readers never lock
        self._on_success(now)
        return True

    def _load(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def _on_success(self, now: float) -> None:
        """Hook for subclasses that track freshness."""

    def start(self) -> None:
        """Load the keys once and start any background work."""
        self.refresh_now()

    def close(self) -> None:
        """Stop background work. Idempotent."""


class StaticJwksSource(JwksSource):
    """Keys given in memory (tests, or keys shipped inside the workload)."""

    def __init__(self, document: Mapping[str, Any], *, name: str = "static") -> None:
        super().__init__(name=name, min_refresh=float("inf"))
        self._document = document
        self.refresh_now()

    def _load(self) -> Mapping[str, Any]:
        return self._document


class FileJwksSource(JwksSource):
    """A JWKS JSON file, re-read when its (mtime, size) changes.

    The file is stat'ed at most once per ``check_interval`` seconds on the request
    path, so rotating keys means rewriting the file (atomically: write, then rename).
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(name=str(path), min_refresh=check_interval, clock=clock)
        self.path = Path(path)
        self._check_interval = check_interval
        self._last_check = float("-inf")
        self._stamp: tuple[int, int] | None = None

    def start(self) -> None:
        """Load the file.

        Raises:
            ConfigError: the file is missing or holds no usable key.
        """
        if not self.refresh_now() or not self._keys:
            raise ConfigError(f"JWKS file {self.path} is unreadable or holds no usable key")

    def get(self, kid: str) -> VerificationKey | None:
        now = self._clock()
        if now - self._last_check >= self._check_interval:
            self._last_check = now
            if self._current_stamp() != self._stamp:
                self.refresh_now()
        return self._keys.get(kid)

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> Mapping[str, Any]:
        stamp = self._current_stamp()
        try:
            data = self.path.read_bytes()
            document = json.loads(data)
        except (OSError, ValueError) as exc:
            raise UnavailableError(f"cannot read JWKS file {self.path}: {exc}") from exc
        self._stamp = stamp
        if not isinstance(document, dict):
            raise ConfigError(f"{self.path}: not a JWKS")
        return document


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A JWKS or discovery URL that redirects elsewhere is refused, not followed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_json(url: str, *, timeout: float) -> dict[str, Any]:
    """GET ``url`` and parse a JSON object (at most 1 MiB, no redirects).

    Raises:
        UnavailableError: network error, non-200 status, too large, or not a JSON object.
    """
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise UnavailableError(f"GET {url}: HTTP {response.status}")
            body = response.read(MAX_JWKS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UnavailableError(f"GET {url}: {exc}") from exc
    if len(body) > MAX_JWKS_BYTES:
        raise UnavailableError(f"GET {url}: response larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise UnavailableError(f"GET {url}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise UnavailableError(f"GET {url}: not a JSON object")
    return document


class UrlJwksSource(JwksSource):
    """Keys fetched from a JWKS URL, or found by OpenID Connect discovery.

    A daemon thread refreshes every ``refresh_interval`` seconds (sooner, every
    ``min_refresh``, while fetches fail). Cached keys keep serving while the issuer is
    unreachable, for at most ``max_stale`` seconds after the last good fetch; then
    they are dropped and tokens are refused until the issuer is back.
    """

    def __init__(
        self,
        jwks_url: str | None = None,
        *,
        oidc_issuer: str | None = None,
        refresh_interval: float = 300.0,
        min_refresh: float = 30.0,
        timeout: float = 3.0,
        max_stale: float = 86_400.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if (jwks_url is None) == (oidc_issuer is None):
            raise ConfigError("give exactly one of jwks_url and oidc_issuer")
        if jwks_url is not None:
            check_fetch_url(jwks_url, what="jwks_url")
        if oidc_issuer is not None:
            check_fetch_url(oidc_issuer, what="OIDC issuer")
        super().__init__(name=jwks_url or str(oidc_issuer), min_refresh=min_refresh, clock=clock)
        self._jwks_url = jwks_url
        self._oidc_issuer = oidc_issuer
        self._refresh_interval = refresh_interval
        self._timeout = timeout
        self._max_stale = max_stale
        self._last_success: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_oidc_issuer(cls, issuer: str, **kwargs: Any) -> UrlJwksSource:
        """A source that finds the JWKS URL in ``<issuer>/.well-known/openid-configuration``."""
        return cls(oidc_issuer=issuer, **kwargs)

    @property
    def jwks_url(self) -> str | None:
        """The JWKS URL (``None`` until discovery has succeeded)."""
        return self._jwks_url

    def get(self, kid: str) -> VerificationKey | None:
        if self._last_success is not None and self._clock() - self._last_success > self._max_stale:
            if self._keys:
                logger.error(
                    "JWKS %s: no successful fetch for %.0f s; dropping cached keys",
                    self.name,
                    self._max_stale,
                )
                self._keys = {}
            return None
        return self._keys.get(kid)

    def _discover(self) -> str:
        assert self._oidc_issuer is not None
        # OpenID Connect Discovery 1.0, section 4: the configuration lives at a fixed path
        # under the issuer, and its "issuer" must equal the issuer we asked (4.3).
        config_url = self._oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
        config = fetch_json(config_url, timeout=self._timeout)
        if config.get("issuer") != self._oidc_issuer:
            raise UnavailableError(f"{config_url}: 'issuer' does not match {self._oidc_issuer!r}")
        jwks_uri = config.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise UnavailableError(f"{config_url}: no 'jwks_uri'")
        try:
            return check_fetch_url(jwks_uri, what="discovered jwks_uri")
        except ConfigError as exc:
            raise UnavailableError(exc.message) from exc

    def _load(self) -> Mapping[str, Any]:
        if self._jwks_url is None:
            self._jwks_url = self._discover()
        return fetch_json(self._jwks_url, timeout=self._timeout)

    def _on_success(self, now: float) -> None:
        self._last_success = now

    def start(self) -> None:
        """Fetch once (a failure is logged, not raised) and start the refresh thread."""
        if self._thread is not None:
            return
        self.refresh_now()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"jwks-refresh {self.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        ok = self._last_success is not None
        while not self._stop.wait(self._refresh_interval if ok else self._min_refresh):
            ok = self.refresh_now()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._timeout + 1)


def attested_key_record(sources: Mapping[str, JwksSource]) -> dict[str, Any]:
    """The token keys as the workload manifest records them, by issuer: a file or
    in-memory JWKS is pinned (its thumbprints, trusted for every scope, ``admin``
    included); a URL issuer's keys change without the workload's knowledge, so it is
    trusted for the other scopes only (``admin: false``, no thumbprints)."""
    out: dict[str, Any] = {}
    for issuer in sorted(sources):
        source = sources[issuer]
        if isinstance(source, UrlJwksSource):
            out[issuer] = {"source": "url", "admin": False}
        else:
            out[issuer] = {
                "source": "file" if isinstance(source, FileJwksSource) else "static",
                "admin": True,
                "thumbprints": sorted(source.thumbprints()),
            }
    return out


def attested_key_record_for(issuers: Iterable[IssuerSettings]) -> dict[str, Any]:
    """:func:`attested_key_record` of configured issuers, reading their JWKS files now
    (URL issuers are not fetched: their record has no keys). What ``sealserve
    measure`` expects a server started with these files to attest. Raises ConfigError
    for a missing or empty JWKS file."""
    sources: dict[str, JwksSource] = {}
    for issuer in issuers:
        source = source_for_issuer_settings(
            issuer, refresh=300.0, min_refresh=30.0, timeout=3.0, max_stale=86_400.0
        )
        if isinstance(source, FileJwksSource):
            source.start()
        sources[issuer.issuer] = source
    return attested_key_record(sources)


def source_for_issuer_settings(
    issuer: IssuerSettings, *, refresh: float, min_refresh: float, timeout: float, max_stale: float
) -> JwksSource:
    """Build the source an :class:`~sealserve.auth.settings.IssuerSettings` names."""
    if issuer.jwks_file is not None:
        return FileJwksSource(Path(os.fspath(issuer.jwks_file)))
    common: dict[str, Any] = {
        "refresh_interval": refresh,
        "min_refresh": min_refresh,
        "timeout": timeout,
        "max_stale": max_stale,
    }
    if issuer.jwks_url is not None:
        return UrlJwksSource(issuer.jwks_url, **common)
    return UrlJwksSource.from_oidc_issuer(issuer.issuer, **common)
