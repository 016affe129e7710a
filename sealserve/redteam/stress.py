"""The rate-limit stress test a model owner runs against their own deployment.

Many accounts over many connections, spread across one or more endpoints (replicas
behind a load balancer, or all of them directly), for a bounded time. For every
account it reports how many requests were admitted against the most its tier's limits
allow in that time, any over-admission, and the refusal codes seen. Bounded in time
and connections; it only talks to the targets it is given.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from sealserve._proto import grpc_service_pb2 as pb
from sealserve.client.attested import ATTESTED_NAME
from sealserve.client.codec import encode_request
from sealserve.defense.limits import Period, Tier, window_bounds

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Endpoint:
    """Where to send: ``target`` with a pinned certificate, or plaintext (cert None)."""

    target: str
    certificate_pem: bytes | None


@dataclass
class AccountResult:
    account: str
    sent: int = 0
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bound: int | None = None

    @property
    def over_admitted(self) -> int:
        return max(0, self.admitted - self.bound) if self.bound is not None else 0


@dataclass
class StressReport:
    accounts: dict[str, AccountResult]
    duration: float
    connections: int

    @property
    def sent(self) -> int:
        return sum(a.sent for a in self.accounts.values())

    @property
    def over_admissions(self) -> int:
        return sum(a.over_admitted for a in self.accounts.values())

    @property
    def consistent(self) -> bool:
        """Every request sent was admitted, refused or failed: none vanished."""
        return all(
            a.sent == a.admitted + sum(a.refused.values()) + sum(a.errors.values())
            for a in self.accounts.values()
        )

    def render(self) -> str:
        lines = [
            f"{'account':<16} {'sent':>7} {'admitted':>9} {'bound':>7} {'over':>5}  refusals",
            f"{'-' * 16} {'-' * 7} {'-' * 9} {'-' * 7} {'-' * 5}  {'-' * 30}",
        ]
        for a in sorted(self.accounts.values(), key=lambda r: r.account):
            codes = ", ".join(f"{k} x{v}" for k, v in sorted((a.refused + a.errors).items()))
            bound = "-" if a.bound is None else str(a.bound)
            lines.append(
                f"{a.account:<16} {a.sent:>7} {a.admitted:>9} {bound:>7} "
                f"{a.over_admitted:>5}  {codes or '-'}"
            )
        lines.append(
            f"\n{len(self.accounts)} accounts, {self.connections} connections, "
            f"{self.duration:.1f} s, {self.sent} requests: "
            f"over-admissions {self.over_admissions}; "
            f"{'every request accounted for' if self.consistent else 'REQUESTS UNACCOUNTED FOR'}"
        )
        return "\n".join(lines)


def quota_bound(tier: Tier, *, start: float, end: float, cost: int = 1) -> int | None:
    """The most requests of ``cost`` units one account of ``tier`` can be admitted in
    [start, end], given an unused account at ``start``; None if the tier is unlimited."""
    bounds: list[int] = []
    bucket = tier.limits.bucket
    if bucket is not None:
        bounds.append(math.floor((bucket.burst + bucket.rate * (end - start)) / cost))
    for period, limit in tier.limits.quotas.items():
        windows, t = 0, start
        while t <= end:
            windows += 1
            t = window_bounds(period, t)[1]
            if period is Period.MONTH and windows > 2:
                break
        bounds.append(windows * (limit // cost))
    return min(bounds) if bounds else None


async def _worker(
    endpoint: Endpoint,
    account: AccountResult,
    token: str,
    payload: bytes,
    deadline: float,
    timeout: float,
) -> None:
    options = [("grpc.ssl_target_name_override", ATTESTED_NAME)]
    if endpoint.certificate_pem is None:
        channel = grpc.aio.insecure_channel(endpoint.target)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=endpoint.certificate_pem)
        channel = grpc.aio.secure_channel(endpoint.target, creds, options=options)
    call = channel.unary_unary(METHOD)
    md = (("authorization", f"Bearer {token}"),)
    try:
        while time.monotonic() < deadline:
            account.sent += 1
            try:
                await call(payload, metadata=md, timeout=timeout)
                account.admitted += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if code in ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "FAILED_PRECONDITION"):
                    account.refused[code] += 1
                else:
                    account.errors[code] += 1
    finally:
        await channel.close()


async def run_stress(
    endpoints: Sequence[Endpoint],
    tokens: Mapping[str, str],
    *,
    model: str,
    inputs: Mapping[str, np.ndarray],
    connections: int,
    duration: float,
    tiers: Mapping[str, Tier] | None = None,
    timeout: float = 10.0,
) -> StressReport:
    """Run the stress test; bounded by ``duration`` seconds and ``connections``."""
    if not endpoints or not tokens or connections < 1 or not 0 < duration <= 600:
        raise ValueError("need endpoints, tokens, connections >= 1 and 0 < duration <= 600")
    payload = encode_request(model, inputs).SerializeToString()
    pb.ModelInferRequest.FromString(payload)  # fail early on an unencodable request
    results = {acct: AccountResult(acct) for acct in tokens}
    names = list(tokens)
    start_wall = time.time()
    deadline = time.monotonic() + duration
    await asyncio.gather(
        *(
            _worker(
                # Each account's connections are spread over every endpoint, so limits
                # are tested across replicas, not per replica.
                endpoints[(k // len(names) + k) % len(endpoints)],
                results[names[k % len(names)]],
                tokens[names[k % len(names)]],
                payload,
                deadline,
                timeout,
            )
            for k in range(connections)
        )
    )
    end_wall = time.time()
    for acct, res in results.items():
        tier = (tiers or {}).get(acct)
        if tier is not None:
            res.bound = quota_bound(tier, start=start_wall, end=end_wall)
    return StressReport(results, end_wall - start_wall, connections)
