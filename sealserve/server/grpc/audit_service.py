"""gRPC adapter for ``sealserve.v1.Audit`` (audit scope, enforced by the interceptor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from sealserve._proto import audit_pb2 as aud
from sealserve.errors import InputError, UnavailableError
from sealserve.rpc.status import grpc_errors

MAX_NONCE = 64


class AuditServicer:
    """``head(nonce)`` returns the signed head's JSON, or None with no audit log."""

    def __init__(self, head: Callable[[bytes], bytes | None]) -> None:
        self._head = head

    @grpc_errors
    async def GetHead(self, request: Any, context: grpc.aio.ServicerContext) -> aud.GetHeadResponse:
        nonce = bytes(request.nonce)
        if len(nonce) > MAX_NONCE:
            raise InputError(f"nonce is {len(nonce)} bytes; at most {MAX_NONCE}")
        head = self._head(nonce)
        if head is None:
            raise UnavailableError("this server keeps no audit log ([defense.audit])")
        return aud.GetHeadResponse(head=head)
