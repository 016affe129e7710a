"""Who is calling: the :class:`Principal` that a verified token yields, and the scopes."""

from __future__ import annotations

from dataclasses import dataclass, field

SCOPE_INFER = "infer"
SCOPE_METADATA = "metadata"
SCOPE_ADMIN = "admin"
SCOPE_AUDIT = "audit"  # sealserve.v1.Audit: the audit log's signed head, for auditors

#: Every scope an RPC may require. A scope is never implied by another one.
SCOPES: frozenset[str] = frozenset({SCOPE_INFER, SCOPE_METADATA, SCOPE_ADMIN, SCOPE_AUDIT})


@dataclass(frozen=True)
class Principal:
    """The verified identity behind one request.

    ``account`` is the token's ``sub``; ``token_id`` its ``jti``; ``expires_at`` its
    ``exp`` (seconds since the epoch); ``issuer`` its ``iss``. ``scopes`` holds every
    scope the token carries (unknown ones included, so they can be logged).
    ``key_thumbprint`` is the RFC 7638 thumbprint of the key that signed it.
    """

    account: str
    tier: str
    scopes: frozenset[str]
    tos_version: str
    token_id: str
    expires_at: float
    issuer: str
    key_thumbprint: str = field(default="", compare=False)

    def has_scope(self, scope: str) -> bool:
        """True when the token carries ``scope``."""
        return scope in self.scopes
