"""gRPC adapter for ``sealserve.v1.Admin`` (admin scope, enforced by the interceptor)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from sealserve._proto import admin_pb2 as adm
from sealserve.defense.audit.log import AuditLog
from sealserve.defense.audit.state import record_status
from sealserve.defense.guard import Guard
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.status import MAX_DIFFICULTY, Status
from sealserve.errors import InputError, UnavailableError
from sealserve.rpc.status import grpc_errors
from sealserve.server.grpc.auth_interceptor import current_principal


class AdminServicer:
    """``audit()``: the audit log operators' status changes go to (None: no log)."""

    def __init__(
        self,
        quota: QuotaGuard | None,
        guard: Guard | None = None,
        audit: Callable[[], AuditLog | None] = lambda: None,
    ) -> None:
        self._quota = quota
        # The guard's output defenses are built after the models load: read them late.
        self._guard = guard
        self._audit = audit

    def _q(self) -> QuotaGuard:
        if self._quota is None:
            raise UnavailableError(
                "no [limits] are configured on this server: nothing to administer"
            )
        return self._quota

    def _info(self, account: str, tier: str, model: str) -> adm.AccountInfo:
        q = self._q()
        if not account:
            raise InputError("account is required")
        info = adm.AccountInfo(account=account, status_json=q.status(account).to_json())
        if tier:
            for r in q.usage(account, tier, model=model or None):
                info.usage.add(name=r.name, limit=r.limit, remaining=r.remaining,
                               reset_after=r.reset_after)  # fmt: skip
        info.history_json.extend(s.to_json() for s in q.history(account)[:50])
        return info

    @grpc_errors
    async def GetAccount(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        return self._info(request.account, request.tier, request.model)

    @grpc_errors
    async def ResetQuota(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        if not request.tier:
            raise InputError("tier is required to reset an account's quota")
        self._q().reset(request.account, request.tier, model=request.model or None)
        return self._info(request.account, request.tier, request.model)

    @grpc_errors
    async def Forgive(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        self._q()
        if not request.account:
            raise InputError("account is required")
        output = self._guard.output if self._guard is not None else None
        if output is None:
            raise UnavailableError("no [defense] is configured on this server: nothing to forgive")
        reason = f" ({request.reason})" if request.reason else ""
        output.forgive(request.account, by=_operator() + reason)
        return self._info(request.account, request.tier, "")

    @grpc_errors
    async def SetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        q, status = self._q(), _requested_status(request)
        previous = q.status(request.account).kind.value
        st = q.apply_status(request.account, status,
                            reason=request.reason or "set by an operator", set_by=_operator(),
                            factor=request.factor or None, difficulty=request.difficulty or None,
                            ttl_s=request.ttl_seconds or None)  # fmt: skip
        audit = self._audit()
        if audit is not None:  # so that a store that loses it gets it back at start
            record_status(audit, request.account, st, previous=previous, now=time.time())
        return self._info(request.account, request.tier, "")


def _operator() -> str:
    """Who made an Admin call, as status changes and forgiveness record it."""
    principal = current_principal()
    return f"admin:{principal.account}" if principal else "admin"


def _requested_status(request: Any) -> Status:
    """The status an operator asked for, with its parameters checked (InputError)."""
    if not request.account:
        raise InputError("account is required")
    try:
        status = Status(request.status)
    except ValueError as exc:
        raise InputError(f"status must be one of {', '.join(k.value for k in Status)}") from exc
    if status is Status.THROTTLED and not 0 < request.factor < 1:
        raise InputError("throttled needs a factor in (0, 1), e.g. 0.1")
    if status is Status.CHALLENGED and not 1 <= request.difficulty <= MAX_DIFFICULTY:
        raise InputError(f"challenged needs a difficulty of 1..{MAX_DIFFICULTY} bits")
    return status
