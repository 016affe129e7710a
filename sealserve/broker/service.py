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
from sealserve.broker.store import KeyRecord
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

    async def _as_admin(self, context: grpc.aio.ServicerContext, fn: Callable[[str], T]) -> T:
        """Verify the bearer token (scope ``admin``) and run ``fn(operator account)``,
        both off the event loop. Raises AuthError or what ``fn`` raises."""
        header = dict(context.invocation_metadata() or ()).get("authorization")
        value = header if isinstance(header, str) else None

        def call() -> T:
            return fn(self._auth.authenticate(value, required_scope=SCOPE_ADMIN).account)

        return await self._run(context, call)

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
            kem_id=sealed.kem_id, kdf_id=sealed.kdf_id, aead_id=sealed.aead_id,
            enc=sealed.enc, ciphertext=sealed.ciphertext,
        )  # fmt: skip

    @grpc_errors
    async def AddKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        add = functools.partial(_add_key, self._broker, request)
        generated = await self._as_admin(context, add)
        return bpb.AddKeyResponse(key_id=request.key_id, generated_key=generated or b"")

    @grpc_errors
    async def SetPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._as_admin(context, functools.partial(_set_policy, self._broker, request))
        return bpb.SetPolicyResponse()

    @grpc_errors
    async def ListKeys(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        records = await self._as_admin(context, lambda _actor: self._broker.list_keys())
        return bpb.ListKeysResponse(keys=[_key_info(r) for r in records])

    @grpc_errors
    async def RevokeKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def revoke(actor: str) -> None:
            self._broker.revoke_key(request.key_id, actor=actor)

        await self._as_admin(context, revoke)
        return bpb.RevokeKeyResponse()


def _add_key(broker: KeyBroker, request: Any, actor: str) -> bytes | None:
    """AddKey's work for ``actor``: a given or generated key under the sent policy."""
    if request.generate == bool(request.key):
        raise InputError("give either a key or generate = true, not both or neither")
    return _policy_from_admin(
        lambda: broker.add_key(
            request.key_id,
            None if request.generate else bytes(request.key),
            policy_toml=request.policy_toml,
            roots=tuple(request.roots),
            actor=actor,
            unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
        )
    )


def _set_policy(broker: KeyBroker, request: Any, actor: str) -> None:
    """SetPolicy's work for ``actor``: replace a key's policy with the sent one."""
    _policy_from_admin(
        lambda: broker.set_policy(
            request.key_id,
            policy_toml=request.policy_toml,
            roots=tuple(request.roots),
            actor=actor,
            unsafe_allow_incomplete=request.unsafe_allow_incomplete_policy,
        )
    )


def _key_info(record: KeyRecord) -> Any:
    """A stored key record as its ``KeyInfo`` message (no key material)."""
    return bpb.KeyInfo(
        key_id=record.key_id,
        policy_toml=record.policy_toml,
        roots=list(record.roots),
        revoked=record.revoked,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )
