"""Plain, frozen configuration of token verification.

The server's pydantic settings build an :class:`AuthSettings`; this module stays free
of pydantic so ``sealserve.auth`` can be used alone. Every value is checked when the
object is built and a bad one raises :class:`sealserve.errors.ConfigError`.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sealserve.errors import ConfigError

#: Asymmetric signature algorithms that may be configured. ``none`` and HS* never are:
#: an HMAC "key" would be the issuer's public key, which anyone can read.
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES256", "RS256", "EdDSA")

#: Claim carrying the terms-of-service version the account accepted.
DEFAULT_TOS_CLAIM = "sealserve_tos"
#: Claim carrying the account's tier (selects quotas and defense profile).
DEFAULT_TIER_CLAIM = "sealserve_tier"
#: Claim carrying the granted scopes, space-separated (RFC 8693 section 4.2, RFC 6749).
DEFAULT_SCOPE_CLAIM = "scope"

MAX_LEEWAY_SECONDS = 300.0
MAX_TOKEN_BYTES_LIMIT = 64 * 1024
_LOOPBACK_NAMES = frozenset({"localhost"})


def check_fetch_url(url: str, *, what: str) -> str:
    """Return ``url`` if keys may be fetched from it: ``https``, or ``http`` to loopback.

    Raises:
        ConfigError: any other scheme, a missing host, or plain http to another host.
    """
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if not host:
        raise ConfigError(f"{what} {url!r} has no host")
    if parsed.scheme == "https":
        return url
    if parsed.scheme == "http" and _is_loopback(host):
        return url
    raise ConfigError(f"{what} {url!r} must use https (plain http is allowed only to loopback)")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class IssuerSettings:
    """One trusted token issuer and where its public keys (JWKS) come from.

    Exactly one of: ``jwks_file`` (a local JWKS JSON file, reloaded when it changes),
    ``jwks_url`` (fetched and refreshed in the background), or ``discover=True``
    (OpenID Connect discovery: the JWKS URL is read from
    ``<issuer>/.well-known/openid-configuration``).
    """

    issuer: str
    jwks_file: Path | None = None
    jwks_url: str | None = None
    discover: bool = False

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigError("an issuer needs a non-empty 'issuer' name")
        sources = sum((self.jwks_file is not None, self.jwks_url is not None, self.discover))
        if sources != 1:
            raise ConfigError(
                f"issuer {self.issuer!r} needs exactly one of jwks_file, jwks_url, discover"
            )
        if self.jwks_url is not None:
            check_fetch_url(self.jwks_url, what="jwks_url")
        if self.discover:
            check_fetch_url(self.issuer, what="OIDC issuer")


@dataclass(frozen=True)
class AuthSettings:
    """How bearer tokens are verified.

    Fields:
        issuers: trusted issuers; a token's ``iss`` must name one of them.
        audience: this service's name; a token's ``aud`` must contain it.
        required_tos_version: the terms-of-service version every token must carry.
        algorithms: accepted signature algorithms (asymmetric only).
        leeway_seconds: clock skew allowed on exp/nbf/iat (at most 300).
        tos_claim, tier_claim, scope_claim: claim names (see the DEFAULT_* constants).
        default_tier: tier given to tokens without a tier claim; ``None`` (the default)
            refuses such tokens.
        allowed_tiers: when set, a token's tier must be one of these.
        max_token_bytes: tokens longer than this are refused before parsing.
        cache_ttl_seconds, cache_max_entries: verified-token cache (0 entries disables).
        jwks_refresh_seconds: background refresh period of URL key sets.
        jwks_min_refresh_seconds: at most one unknown-``kid`` refresh per issuer per period.
        jwks_fetch_timeout_seconds: timeout of one JWKS or discovery fetch.
        jwks_max_stale_seconds: cached URL keys stop being used when the issuer has been
            unreachable for this long.
        revocation_file: JSON file of revoked token ids and suspended accounts.
    """

    issuers: tuple[IssuerSettings, ...]
    audience: str
    required_tos_version: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = 30.0
    tos_claim: str = DEFAULT_TOS_CLAIM
    tier_claim: str = DEFAULT_TIER_CLAIM
    scope_claim: str = DEFAULT_SCOPE_CLAIM
    default_tier: str | None = None
    allowed_tiers: frozenset[str] | None = None
    max_token_bytes: int = 8 * 1024
    cache_ttl_seconds: float = 300.0
    cache_max_entries: int = 10_000
    jwks_refresh_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 30.0
    jwks_fetch_timeout_seconds: float = 3.0
    jwks_max_stale_seconds: float = 86_400.0
    revocation_file: Path | None = None

    @classmethod
    def from_mapping(cls, data: Any) -> AuthSettings:
        """Build from the ``[auth]`` table (docs/auth.md), ``[[auth.issuers]]`` included.

        Raises ConfigError naming the key for an unknown key or a bad value.
        """
        if not isinstance(data, dict):
            raise ConfigError("auth must be a table ([auth])")
        data = dict(data)
        issuers = data.pop("issuers", [])
        if not isinstance(issuers, list) or not all(isinstance(i, dict) for i in issuers):
            raise ConfigError("auth.issuers must be a list of tables ([[auth.issuers]])")
        _known_keys("auth", data, cls)
        for n, issuer in enumerate(issuers):
            _known_keys(f"auth.issuers[{n}]", issuer, IssuerSettings)
        try:
            built = tuple(
                IssuerSettings(
                    **{**i, "jwks_file": Path(i["jwks_file"]) if "jwks_file" in i else None}
                )
                for i in issuers
            )
            if "revocation_file" in data:
                data["revocation_file"] = Path(data["revocation_file"])
            if "algorithms" in data:
                data["algorithms"] = tuple(data["algorithms"])
            if data.get("allowed_tiers") is not None:
                data["allowed_tiers"] = frozenset(data["allowed_tiers"])
            return cls(issuers=built, **data)
        except TypeError as exc:
            raise ConfigError(f"unknown or missing auth setting: {exc}") from exc

    def relative_to(self, base: Path) -> AuthSettings:
        """These settings with relative file paths (JWKS files, the revocation list)
        taken relative to ``base`` (the config file's directory)."""

        def fix(path: Path | None) -> Path | None:
            return base / path if path is not None and not path.is_absolute() else path

        issuers = tuple(replace(i, jwks_file=fix(i.jwks_file)) for i in self.issuers)
        return replace(self, issuers=issuers, revocation_file=fix(self.revocation_file))

    def __post_init__(self) -> None:
        object.__setattr__(self, "issuers", tuple(self.issuers))
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        if not self.issuers:
            raise ConfigError("auth needs at least one trusted issuer")
        names = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise ConfigError("each issuer may be configured only once")
        if not self.audience:
            raise ConfigError("auth needs a non-empty audience")
        if not self.required_tos_version:
            raise ConfigError("auth needs the required terms-of-service version")
        if not self.algorithms:
            raise ConfigError("auth needs at least one accepted algorithm")
        for alg in self.algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ConfigError(
                    f"algorithm {alg!r} is not accepted; choose from "
                    f"{', '.join(sorted(SUPPORTED_ALGORITHMS))} (never 'none' or HMAC)"
                )
        if not 0 <= self.leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ConfigError(f"leeway_seconds must be between 0 and {MAX_LEEWAY_SECONDS:g}")
        if not (self.tos_claim and self.tier_claim and self.scope_claim):
            raise ConfigError("claim names must not be empty")
        if self.default_tier == "":
            raise ConfigError("default_tier must be a tier name or None")
        if self.allowed_tiers is not None:
            object.__setattr__(self, "allowed_tiers", frozenset(self.allowed_tiers))
            if self.default_tier is not None and self.default_tier not in self.allowed_tiers:
                raise ConfigError("default_tier must be one of allowed_tiers")
        if not 256 <= self.max_token_bytes <= MAX_TOKEN_BYTES_LIMIT:
            raise ConfigError(f"max_token_bytes must be between 256 and {MAX_TOKEN_BYTES_LIMIT}")
        if self.cache_ttl_seconds < 0 or self.cache_max_entries < 0:
            raise ConfigError("token cache ttl and size must not be negative")
        if self.jwks_min_refresh_seconds < 1 or self.jwks_refresh_seconds < 1:
            raise ConfigError("JWKS refresh periods must be at least 1 second")
        if not 0 < self.jwks_fetch_timeout_seconds <= 30:
            raise ConfigError("jwks_fetch_timeout_seconds must be in (0, 30]")
        if self.jwks_max_stale_seconds < self.jwks_refresh_seconds:
            raise ConfigError("jwks_max_stale_seconds must be at least jwks_refresh_seconds")

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for the workload manifest (no secrets, no paths).

        Auditors read the enforced terms version, issuers, audience and algorithms here.
        """
        return {
            "issuers": sorted(i.issuer for i in self.issuers),
            "audience": self.audience,
            "required_tos_version": self.required_tos_version,
            "tos_claim": self.tos_claim,
            "tier_claim": self.tier_claim,
            "scope_claim": self.scope_claim,
            "algorithms": sorted(self.algorithms),
            "leeway_seconds": self.leeway_seconds,
            "default_tier": self.default_tier,
            "allowed_tiers": sorted(self.allowed_tiers) if self.allowed_tiers else None,
            "max_token_bytes": self.max_token_bytes,
        }


def _known_keys(table: str, data: dict[str, Any], cls: type[Any]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{table}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})",
            remedy=f"Remove or correct the key; docs/auth.md lists the [{table}] keys.",
        )
