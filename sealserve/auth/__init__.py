"""sealserve.auth: JWT bearer-token verification -> :class:`Principal`; token issuing.

Transport-free (no grpc): the server's interceptor calls
``Authenticator.authenticate(header_value, required_scope=...)`` per request.
"""

from sealserve.auth.authenticator import INVALID_TOKEN_MESSAGE, Authenticator
from sealserve.auth.issuer import TokenIssuer, generate_keypair, parse_ttl, public_jwk
from sealserve.auth.keys import (
    FileJwksSource,
    JwksSource,
    StaticJwksSource,
    UrlJwksSource,
    VerificationKey,
    jwk_thumbprint,
    parse_jwks,
)
from sealserve.auth.principal import (
    SCOPE_ADMIN,
    SCOPE_INFER,
    SCOPE_METADATA,
    SCOPES,
    Principal,
)
from sealserve.auth.revocation import (
    FileRevocationList,
    InMemoryRevocationList,
    RevocationList,
    dump_revocations,
)
from sealserve.auth.settings import AuthSettings, IssuerSettings

__all__ = [
    "INVALID_TOKEN_MESSAGE",
    "SCOPES",
    "SCOPE_ADMIN",
    "SCOPE_INFER",
    "SCOPE_METADATA",
    "AuthSettings",
    "Authenticator",
    "FileJwksSource",
    "FileRevocationList",
    "InMemoryRevocationList",
    "IssuerSettings",
    "JwksSource",
    "Principal",
    "RevocationList",
    "StaticJwksSource",
    "TokenIssuer",
    "UrlJwksSource",
    "VerificationKey",
    "dump_revocations",
    "generate_keypair",
    "jwk_thumbprint",
    "parse_jwks",
    "parse_ttl",
    "public_jwk",
]
