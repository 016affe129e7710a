"""Refused requests in the audit log, without letting a flood grow it without bound.

Every refusal (rate limit or quota, account status, proof of work) is counted. The
first ``threshold`` refusals of an account in an interval of ``interval_s`` seconds are
written one record each (kind ``refusal``); beyond that they are added up per account,
model, reason and detail, and written as one ``refusals`` record (with ``count``,
``rows``, ``first_time``, ``last_time`` and ``aggregated`` saying why) when the
account's interval ends, at the next checkpoint after it, or when the log closes. A
flood of refusals thus costs at most ``threshold`` + (distinct reasons) records per
account per interval, and the sum of ``count`` over both kinds is exactly the number
of refusals clients were sent.

Pure bookkeeping: :class:`RefusalCounter` decides what to write; the audit log writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sealserve.errors import ChallengeRequiredError, RefusedError, SuspendedError

# Reasons a request is refused before inference, as the audit log names them.
RATE_LIMIT = "rate_limit"
SUSPENDED = "suspended"
CHALLENGE = "challenge"
REFUSED = "refused"
MAX_DETAIL = 120


def refusal_reason(exc: RefusedError) -> str:
    """The audit log's name for a refusal: ``rate_limit``, ``suspended`` or ``challenge``."""
    if isinstance(exc, SuspendedError):
        return SUSPENDED
    if isinstance(exc, ChallengeRequiredError):
        return CHALLENGE
    return RATE_LIMIT if type(exc).__name__ == "RateLimitedError" else REFUSED


@dataclass
class _Window:
    start: float
    written: int = 0


@dataclass
class _Pending:
    count: int = 0
    rows: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class RefusalCounter:
    """Which refusals to write one by one and which to add up (see the module doc)."""

    threshold: int = 20
    interval_s: float = 60.0
    max_accounts: int = 10_000
    _windows: dict[str, _Window] = field(default_factory=dict)
    _pending: dict[tuple[str, str, str, str], _Pending] = field(default_factory=dict)
    _next_sweep: float = 0.0

    def note(
        self, now: float, *, account: str, model: str, reason: str, detail: str, rows: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Count one refusal. Returns the aggregate records now due (write them first)
        and this refusal's own record, or None when it was added to an aggregate."""
        due = self.due(now)
        if len(self._windows) >= self.max_accounts and account not in self._windows:
            due += self.drain()  # bounded memory: flush everything early
        w = self._windows.get(account)
        if w is None or now - w.start >= self.interval_s:
            due += self._flush_account(account)
            w = self._windows[account] = _Window(now)
        short = detail[:MAX_DETAIL]
        if w.written < self.threshold:
            w.written += 1
            return due, {"account": account, "model": model, "refusal": reason,
                         "detail": short, "rows": int(rows)}  # fmt: skip
        key = (account, model, reason, short)
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending(first=now)
        p.count += 1
        p.rows += int(rows)
        p.last = now
        return due, None

    def due(self, now: float) -> list[dict[str, Any]]:
        """Aggregates of accounts whose interval has ended (checked at most once a second)."""
        if now < self._next_sweep:
            return []
        self._next_sweep = now + 1.0
        out: list[dict[str, Any]] = []
        for account in [a for a, w in self._windows.items() if now - w.start >= self.interval_s]:
            out += self._flush_account(account)
            del self._windows[account]
        return out

    def drain(self) -> list[dict[str, Any]]:
        """Every pending aggregate (at close, or when too many accounts are tracked)."""
        out = [self._record(k, p) for k, p in self._pending.items()]
        self._pending.clear()
        self._windows.clear()
        return out

    def _flush_account(self, account: str) -> list[dict[str, Any]]:
        keys = [k for k in self._pending if k[0] == account]
        return [self._record(k, self._pending.pop(k)) for k in keys]

    def _record(self, key: tuple[str, str, str, str], p: _Pending) -> dict[str, Any]:
        account, model, reason, detail = key
        return {
            "account": account, "model": model, "refusal": reason, "detail": detail,
            "count": p.count, "rows": p.rows, "first_time": p.first, "last_time": p.last,
            "aggregated": f"refusals beyond {self.threshold} per account per "
                          f"{self.interval_s:g} s are added up",
        }  # fmt: skip
