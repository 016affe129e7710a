"""Token issuing for operators and tests: signing keys, JWKS and tokens.

Production deployments usually take tokens from an OIDC provider; ``TokenIssuer``
exists for operators who run their own issuer (``sealserve token issue``) and for
tests. Keys are identified by their RFC 7638 thumbprint, so the ``kid`` in a JWKS
and in the tokens the same key signs always agree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sealserve.auth.keys import allowed_algorithms_for, jwk_thumbprint
from sealserve.auth.principal import SCOPES
from sealserve.auth.settings import (
    DEFAULT_SCOPE_CLAIM,
    DEFAULT_TIER_CLAIM,
    DEFAULT_TOS_CLAIM,
    SUPPORTED_ALGORITHMS,
)
from sealserve.errors import ConfigError, InputError

KEYGEN_ALGORITHMS: tuple[str, ...] = ("ES256", "ES384", "EdDSA", "RS256", "PS256")
MAX_TTL = timedelta(days=366)
_TTL_REMEDY = "Give a duration such as 90s, 15m, 1h or 7d."
_ISSUE_REMEDY = "Give a non-empty subject, known scopes and a positive ttl."

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def public_jwk(public_key: Any, *, alg: str) -> dict[str, Any]:
    """The public JWK of ``public_key`` with ``kid`` (RFC 7638 thumbprint), ``use``, ``alg``.

    Raises:
        ConfigError: the key type cannot sign with ``alg``.
    """
    if alg not in allowed_algorithms_for(public_key):
        raise ConfigError(f"a {type(public_key).__name__} cannot sign {alg}")
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = dict(algorithm.to_jwk(public_key, as_dict=True))
    jwk["kid"] = jwk_thumbprint(jwk)
    jwk["use"] = "sig"
    jwk["alg"] = alg
    return jwk


def generate_keypair(alg: str = "ES256") -> tuple[bytes, dict[str, Any]]:
    """A new signing key: (unencrypted PKCS#8 PEM of the private key, JWKS with its public key).

    Raises:
        ConfigError: ``alg`` is not one of :data:`KEYGEN_ALGORITHMS`.
    """
    private: PrivateKey
    if alg in ("ES256", "ES384"):
        private = ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif alg in ("RS256", "PS256"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise ConfigError(f"keygen supports {', '.join(KEYGEN_ALGORITHMS)}, not {alg!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, {"keys": [public_jwk(private.public_key(), alg=alg)]}


def _default_alg(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RS256"
    algs = allowed_algorithms_for(public_key)
    if len(algs) != 1:
        raise ConfigError(f"cannot sign tokens with a {type(public_key).__name__}")
    return next(iter(algs))


def parse_ttl(text: str) -> timedelta:
    """Parse ``90``, ``90s``, ``15m``, ``1h`` or ``7d`` into a positive timedelta.

    Raises:
        InputError: not a duration, not positive, or longer than 366 days.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:])
    number = text[:-1] if factor else text
    try:
        seconds = float(number) * (factor or 1)
    except ValueError as exc:
        raise InputError(f"not a duration: {text!r}", remedy=_TTL_REMEDY) from exc
    if not 0 < seconds <= MAX_TTL.total_seconds():
        raise InputError(f"duration {text!r} is not in (0, 366 days]", remedy=_TTL_REMEDY)
    return timedelta(seconds=seconds)


class TokenIssuer:
    """Signs access tokens that :class:`~sealserve.auth.Authenticator` accepts.

    Make one with :meth:`from_pem`. ``kid`` defaults to the public key's RFC 7638
    thumbprint, ``algorithm`` to the key type's algorithm (RSA: RS256).
    """

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        issuer: str,
        audience: str,
        kid: str | None = None,
        algorithm: str | None = None,
    ) -> None:
        public = private_key.public_key()
        alg = algorithm or _default_alg(public)
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"cannot issue tokens with {alg!r}")
        self._jwk = public_jwk(public, alg=alg)
        self._key = private_key
        self.algorithm = alg
        self.kid = kid or self._jwk["kid"]
        self._jwk["kid"] = self.kid
        if not issuer or not audience:
            raise ConfigError("a token issuer needs an issuer name and an audience")
        self.issuer = issuer
        self.audience = audience

    @classmethod
    def from_pem(
        cls,
        pem: bytes,
        *,
        issuer: str,
        audience: str,
        kid: str | None = None,
        algorithm: str | None = None,
        password: bytes | None = None,
    ) -> TokenIssuer:
        """Load an unencrypted (or ``password``-protected) PEM private key.

        Raises:
            ConfigError: not a PEM private key of a supported type.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not a usable PEM private key: {exc}") from exc
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ConfigError(f"unsupported private key type {type(key).__name__}")
        return cls(key, issuer=issuer, audience=audience, kid=kid, algorithm=algorithm)

    def jwks(self) -> dict[str, Any]:
        """The JWKS that verifies this issuer's tokens."""
        return {"keys": [dict(self._jwk)]}

    def issue(
        self,
        sub: str,
        *,
        tier: str,
        scopes: Iterable[str],
        tos_version: str,
        ttl: timedelta | float,
        jti: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        tier_claim: str = DEFAULT_TIER_CLAIM,
        tos_claim: str = DEFAULT_TOS_CLAIM,
        scope_claim: str = DEFAULT_SCOPE_CLAIM,
    ) -> str:
        """Sign a token for account ``sub``, valid from now for ``ttl``.

        Raises:
            InputError: empty ``sub``, unknown scope, or non-positive ``ttl``.
        """
        return self.issue_at_time(
            time.time(),
            sub,
            tier=tier,
            scopes=scopes,
            tos_version=tos_version,
            ttl=ttl,
            jti=jti,
            extra_claims=extra_claims,
            tier_claim=tier_claim,
            tos_claim=tos_claim,
            scope_claim=scope_claim,
        )

    def issue_at_time(
        self,
        now: float,
        sub: str,
        *,
        tier: str,
        scopes: Iterable[str],
        tos_version: str,
        ttl: timedelta | float,
        jti: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        tier_claim: str = DEFAULT_TIER_CLAIM,
        tos_claim: str = DEFAULT_TOS_CLAIM,
        scope_claim: str = DEFAULT_SCOPE_CLAIM,
    ) -> str:
        """:meth:`issue` as if the clock read ``now`` (seconds since the epoch)."""
        seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
        scope_list = sorted(set(scopes))
        if not sub:
            raise InputError("a token needs a subject (account)", remedy=_ISSUE_REMEDY)
        if seconds <= 0:
            raise InputError("a token's ttl must be positive", remedy=_ISSUE_REMEDY)
        unknown = set(scope_list) - SCOPES
        if unknown:
            raise InputError(
                f"unknown scope(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(SCOPES))}",
                remedy=_ISSUE_REMEDY,
            )
        issued = int(now)
        claims: dict[str, Any] = dict(extra_claims or {})
        claims.update(
            {
                "iss": self.issuer,
                "aud": self.audience,
                "sub": sub,
                "iat": issued,
                "nbf": issued,
                "exp": issued + max(1, round(seconds)),
                "jti": jti or uuid.uuid4().hex,
                tier_claim: tier,
                tos_claim: tos_version,
                scope_claim: " ".join(scope_list),
            }
        )
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.kid})
