"""gRPC adapter for ``sealserve.v1.KeyBroker``: thin methods over :class:`KeyBroker`.

Error mapping lives here, once (the broker is its own process and does not import the
server's). A refused release is PERMISSION_DENIED "key release refused" whatever the
reason; admin calls need ``authorization: Bearer <JWT>`` with scope ``admin``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from sealserve._proto import broker_pb2 as bpb
from sealserve.auth import SCOPE_ADMIN, Authenticator
from sealserve.broker.core import KeyBroker
from sealserve.errors import (
    AuthenticationError,
    ConfigError,
    InputError,
    KeyReleaseError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    SealserveError,
    UnavailableError,
)

log = logging.getLogger("sealserve.broker")
T = TypeVar("T")

_CODES: tuple[tuple[type[SealserveError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # an admin sent a bad policy/roots
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (KeyReleaseError, grpc.StatusCode.PERMISSION_DENIED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-facing message) for ``exc``; anything unexpected is INTERNAL
    with an incident id (details only in the log)."""
    if isinstance(exc, SealserveError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                return code, exc.message
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"


class KeyBrokerServicer:
    def __init__(self, broker: KeyBroker, authenticator: Authenticator) -> None:
        self._broker = broker
        self._auth = authenticator

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            # Verification and the store's fsync are blocking work: off the event loop.
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except Exception as exc:
            code, message = to_status(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    def _admin(self, context: grpc.aio.ServicerContext) -> Callable[[], str]:
        """A check to run off the loop: verifies the bearer token (scope ``admin``) and
        returns the operator's account, or raises AuthError."""
        header = dict(context.invocation_metadata() or ()).get("authorization")
        value = header if isinstance(header, str) else None
        return lambda: self._auth.authenticate(value, required_scope=SCOPE_ADMIN).account

    async def GetChallenge(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        nonce = await self._run(context, self._broker.challenge)
        return bpb.GetChallengeResponse(
            nonce=nonce, ttl_seconds=max(1, int(self._broker.nonces.ttl))
        )

    async def ReleaseKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        release = functools.partial(
            self._broker.release, request.key_id, bytes(request.evidence), peer=context.peer()
        )
        sealed = await self._run(context, release)
        return bpb.ReleaseKeyResponse(
            kem_id=sealed.kem_id,
            kdf_id=sealed.kdf_id,
            aead_id=sealed.aead_id,
            enc=sealed.enc,
            ciphertext=sealed.ciphertext,
        )

    async def AddKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def add() -> bytes | None:
            actor = authorize()
            if request.generate == bool(request.key):
                raise InputError("give either a key or generate = true, not both or neither")
            return self._broker.add_key(
                request.key_id,
                None if request.generate else bytes(request.key),
                policy_toml=request.policy_toml,
                roots=tuple(request.roots),
                actor=actor,
                unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
            )

        generated = await self._run(context, add)
        return bpb.AddKeyResponse(key_id=request.key_id, generated_key=generated or b"")

    async def SetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def set_policy() -> None:
            actor = authorize()
            self._broker.set_policy(
                request.key_id,
                policy_toml=request.policy_toml,
                roots=tuple(request.roots),
                actor=actor,
                unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
            )

        await self._run(context, set_policy)
        return bpb.SetPolicyResponse()

    async def ListKeys(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def list_keys() -> list[Any]:
            authorize()
            return [
                bpb.KeyInfo(
                    key_id=r.key_id,
                    policy_toml=r.policy_toml,
                    roots=list(r.roots),
                    revoked=r.revoked,
                    created_at=r.created_at,
                    updated_at=r.updated_at,
                )
                for r in self._broker.list_keys()
            ]

        return bpb.ListKeysResponse(keys=await self._run(context, list_keys))

    async def RevokeKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def revoke() -> None:
            actor = authorize()
            self._broker.revoke_key(request.key_id, actor=actor)

        await self._run(context, revoke)
        return bpb.RevokeKeyResponse()
