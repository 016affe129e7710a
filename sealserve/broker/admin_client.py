"""The broker's admin API over gRPC, for the CLI and for scripts.

Every call sends ``authorization: Bearer <token>``; the token is a JWT with scope
``admin`` for the broker's audience (docs/key-broker.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from sealserve._proto import broker_pb2 as bpb
from sealserve._proto import broker_pb2_grpc
from sealserve.errors import (
    AuthenticationError,
    InputError,
    NotFoundError,
    PermissionDeniedError,
    SealserveError,
    UnavailableError,
)


@dataclass(frozen=True)
class KeyInfo:
    """What the broker tells an admin about a key (never the key itself)."""

    key_id: str
    policy_toml: str
    roots: tuple[str, ...]
    revoked: bool
    created_at: float
    updated_at: float


def _error(exc: grpc.RpcError) -> SealserveError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = (exc.details() if hasattr(exc, "details") else None) or str(code)
    message = f"key broker: {detail}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(
            message, remedy="Pass an admin token (JWT with scope 'admin' for the broker)."
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(message, remedy="List the keys with `sealserve broker list`.")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InputError(message, remedy="Fix the request named in the message.")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(
            message, remedy="Check the broker address, that it is running, and its CA."
        )
    return SealserveError(message)


class BrokerAdmin:
    """Admin calls to the broker at ``target`` ("host:port") over TLS.

    ``ca_pem``: the broker's certificate or CA (None: the system roots).
    ``server_name``: the name to check in the broker's certificate, when it differs
    from the target host. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str,
        ca_pem: bytes | None,
        server_name: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        options: list[tuple[str, Any]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options
        )
        self._stub = broker_pb2_grpc.KeyBrokerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token.strip()}"),)
        self._timeout = timeout

    def __enter__(self) -> BrokerAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def add_key(
        self,
        key_id: str,
        key: bytes | None = None,
        *,
        policy_toml: str = "",
        roots: Iterable[str] = (),
        unsafe_allow_incomplete_policy: bool = False,
    ) -> bytes | None:
        """Deposit ``key`` (or, with None, have the broker generate one, returned once).

        Raises AuthenticationError / PermissionDeniedError (admin credential),
        InputError (existing id, bad key, policy or roots), UnavailableError.
        """
        response = self._call(
            "AddKey",
            bpb.AddKeyRequest(
                key_id=key_id,
                key=key or b"",
                generate=key is None,
                policy_toml=policy_toml,
                roots=list(roots),
                unsafe_allow_incomplete_policy=unsafe_allow_incomplete_policy,
            ),
        )
        return bytes(response.generated_key) or None

    def set_policy(
        self,
        key_id: str,
        policy_toml: str,
        *,
        roots: Iterable[str] = (),
        unsafe_allow_incomplete_policy: bool = False,
    ) -> None:
        """Replace a key's release policy (and roots when given). Raises as add_key,
        and NotFoundError for an unknown or revoked key."""
        self._call(
            "SetPolicy",
            bpb.SetPolicyRequest(
                key_id=key_id,
                policy_toml=policy_toml,
                roots=list(roots),
                unsafe_allow_incomplete_policy=unsafe_allow_incomplete_policy,
            ),
        )

    def list_keys(self) -> list[KeyInfo]:
        response = self._call("ListKeys", bpb.ListKeysRequest())
        return [
            KeyInfo(
                k.key_id,
                k.policy_toml,
                tuple(k.roots),
                k.revoked,
                k.created_at,
                k.updated_at,
            )
            for k in response.keys
        ]

    def revoke_key(self, key_id: str) -> None:
        """Erase a key at the broker for good. Raises NotFoundError if unknown."""
        self._call("RevokeKey", bpb.RevokeKeyRequest(key_id=key_id))
