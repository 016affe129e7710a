"""gRPC adapter for ``sealserve.v1.KeyBroker``: thin methods over :class:`KeyBroker`.

Errors map to statuses through the adapter the server uses too
(:func:`sealserve.rpc.status.grpc_errors`). A refused release is PERMISSION_DENIED
"key release refused" whatever the reason; admin calls need ``authorization: Bearer
<JWT>`` with scope ``admin``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from sealserve._proto import broker_pb2 as bpb
from sealserve.auth import SCOPE_ADMIN, Authenticator
from sealserve.broker.core import KeyBroker
from sealserve.errors import (
    ConfigError,
    InputError,
)
from sealserve.rpc.status import grpc_errors

log = logging.getLogger("sealserve.broker")
T = TypeVar("T")


def _policy_from_admin(fn: Callable[[], T]) -> T:
    """Run ``fn``; a bad policy or roots *sent by the admin* is the client's input
    (INVALID_ARGUMENT with the reason), not this broker's configuration."""
    try:
        return fn()
    except ConfigError as exc:
        raise InputError(exc.message) from exc


class KeyBrokerServicer:
    def __init__(self, broker: KeyBroker, authenticator: Authenticator) -> None:
        self._broker = broker
        self._auth = authenticator

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
        # Verification and the store's fsync are blocking work: off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    def _admin(self, context: grpc.aio.ServicerContext) -> Callable[[], str]:
        """A check to run off the loop: verifies the bearer token (scope ``admin``) and
        returns the operator's account, or raises AuthError."""
        header = dict(context.invocation_metadata() or ()).get("authorization")
        value = header if isinstance(header, str) else None
        return lambda: self._auth.authenticate(value, required_scope=SCOPE_ADMIN).account

    @grpc_errors
    async def GetChallenge(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        nonce = await self._run(context, self._broker.challenge)
        return bpb.GetChallengeResponse(
            nonce=nonce, ttl_seconds=max(1, int(self._broker.nonces.ttl))
        )

    @grpc_errors
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

    @grpc_errors
    async def AddKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def add() -> bytes | None:
            actor = authorize()
            if request.generate == bool(request.key):
                raise InputError("give either a key or generate = true, not both or neither")
            return _policy_from_admin(
                lambda: self._broker.add_key(
                    request.key_id,
                    None if request.generate else bytes(request.key),
                    policy_toml=request.policy_toml,
                    roots=tuple(request.roots),
                    actor=actor,
                    unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
                )
            )

        generated = await self._run(context, add)
        return bpb.AddKeyResponse(key_id=request.key_id, generated_key=generated or b"")

    @grpc_errors
    async def SetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def set_policy() -> None:
            actor = authorize()
            _policy_from_admin(
                lambda: self._broker.set_policy(
                    request.key_id,
                    policy_toml=request.policy_toml,
                    roots=tuple(request.roots),
                    actor=actor,
                    unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
                )
            )

        await self._run(context, set_policy)
        return bpb.SetPolicyResponse()

    @grpc_errors
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

    @grpc_errors
    async def RevokeKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize = self._admin(context)

        def revoke() -> None:
            actor = authorize()
            self._broker.revoke_key(request.key_id, actor=actor)

        await self._run(context, revoke)
        return bpb.RevokeKeyResponse()
