"""gRPC adapter for ``sealserve.v1.Admin`` (admin scope, enforced by the interceptor)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from sealserve._proto import admin_pb2 as adm
from sealserve.defense.audit import AuditLog
from sealserve.defense.audit_state import record_status
from sealserve.defense.quota import QuotaGuard
from sealserve.defense.store import StatusKind
from sealserve.errors import InputError, UnavailableError
from sealserve.server.auth_interceptor import current_principal
from sealserve.server.status import abort


class AdminServicer:
    """``audit()``: the audit log operators' status changes go to (None: no log)."""

    def __init__(
        self, quota: QuotaGuard | None, audit: Callable[[], AuditLog | None] = lambda: None
    ) -> None:
        self._quota = quota
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

    async def GetAccount(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        try:
            return self._info(request.account, request.tier, request.model)
        except Exception as exc:
            await abort(context, exc)
            raise

    async def ResetQuota(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        try:
            if not request.tier:
                raise InputError("tier is required to reset an account's quota")
            self._q().reset(request.account, request.tier, model=request.model or None)
            return self._info(request.account, request.tier, request.model)
        except Exception as exc:
            await abort(context, exc)
            raise

    async def SetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> adm.AccountInfo:
        try:
            q = self._q()
            principal = current_principal()
            by = f"admin:{principal.account}" if principal else "admin"
            reason = request.reason or "set by an operator"
            ttl = request.ttl_seconds or None
            account = request.account
            if not account:
                raise InputError("account is required")
            try:
                kind = StatusKind(request.status)
            except ValueError as exc:
                raise InputError(
                    f"status must be one of {', '.join(k.value for k in StatusKind)}"
                ) from exc
            previous = q.status(account).kind.value
            if kind is StatusKind.NORMAL:
                status = q.lift(account, reason=reason, set_by=by)
            elif kind is StatusKind.THROTTLED:
                if not 0 < request.factor < 1:
                    raise InputError("throttled needs a factor in (0, 1), e.g. 0.1")
                status = q.throttle(account, request.factor, reason=reason, set_by=by, ttl_s=ttl)
            elif kind is StatusKind.CHALLENGED:
                if not 1 <= request.difficulty <= 32:
                    raise InputError("challenged needs a difficulty of 1..32 bits")
                status = q.challenge(
                    account, request.difficulty, reason=reason, set_by=by, ttl_s=ttl
                )
            else:
                status = q.suspend(account, reason=reason, set_by=by, ttl_s=ttl)
            audit = self._audit()
            if audit is not None:  # so that a store that loses it gets it back at start
                record_status(audit, account, status, previous=previous, now=time.time())
            return self._info(account, request.tier, "")
        except Exception as exc:
            await abort(context, exc)
            raise
