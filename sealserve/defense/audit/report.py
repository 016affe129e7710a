"""The owner's query-volume analysis of an audit log (numbers only; the CLI draws).

Reads ``query`` and ``status`` records and summarises each account: volume, peak
hourly rate, the highest score each detector gave it, its input-space coverage
relative to honest traffic (``distribution.coverage_ratio``; 1.0 = like the honest
reference) and its status history.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AccountSummary:
    """One account's activity in the log."""

    account: str
    queries: int = 0
    refused: int = 0
    models: set[str] = field(default_factory=set)
    first: float = math.inf
    last: float = -math.inf
    per_hour: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    max_scores: dict[str, float] = field(default_factory=dict)
    coverage_ratio: float | None = None
    outlier_rate: float | None = None
    status: str = "ok"
    status_changes: int = 0
    last_reason: str = ""

    @property
    def peak_per_hour(self) -> int:
        return max(self.per_hour.values(), default=0)

    @property
    def max_score(self) -> float:
        return max(self.max_scores.values(), default=0.0)

    @property
    def top_detector(self) -> str:
        if not self.max_scores:
            return "-"
        return max(self.max_scores.items(), key=lambda kv: kv[1])[0]


def summarize_accounts(records: Iterable[Mapping[str, Any]]) -> list[AccountSummary]:
    """Per-account summaries, highest volume first."""
    accounts: dict[str, AccountSummary] = {}
    for rec in records:
        kind = rec.get("kind")
        if kind not in ("query", "status"):
            continue
        name = str(rec.get("account", "?"))
        acc = accounts.setdefault(name, AccountSummary(name))
        t = rec.get("time")
        t = float(t) if isinstance(t, int | float) else 0.0
        if kind == "status":
            acc.status = str(rec.get("status", "?"))
            acc.status_changes += 1
            acc.last_reason = str(rec.get("reason", ""))
            continue
        acc.queries += 1
        if rec.get("decision") not in (None, "ok", "log"):
            acc.refused += 1
        acc.models.add(str(rec.get("model", "?")))
        acc.first, acc.last = min(acc.first, t), max(acc.last, t)
        acc.per_hour[int(t // 3600)] += 1
        flags = rec.get("flags")
        if not isinstance(flags, Mapping):
            continue
        for key, value in flags.items():
            if not isinstance(value, int | float):
                continue
            if "." not in key:
                acc.max_scores[key] = max(acc.max_scores.get(key, 0.0), float(value))
            elif key.endswith(".coverage_ratio"):
                acc.coverage_ratio = float(value)
            elif key.endswith(".outlier_rate"):
                acc.outlier_rate = float(value)
    return sorted(accounts.values(), key=lambda a: (-a.queries, a.account))
