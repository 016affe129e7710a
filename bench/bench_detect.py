"""Detection and audit cost, state size, queries-to-detection and honest flag rate.

    PYTHONPATH=. python bench/bench_detect.py [--accounts 100] [--queries 2000]

Prints markdown tables. The demo task is tests/defense/streams.py (logistic regression
on digits 0-4; reference = its training images; split A tunes, split B tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sealserve.defense.audit.log import AuditKey, AuditLog, digest_array, sha256_hex
from sealserve.defense.detect import (
    DetectorSuite,
    DistributionConfig,
    DistributionDetector,
    MemoryBlobStore,
    PradaConfig,
    PradaDetector,
    VolumeConfig,
    VolumeDetector,
)
from sealserve.defense.escalation import ResponsePolicy
from sealserve.defense.status import AccountStatus, Status
from tests.defense.streams import (
    digits_task,
    honest_stream,
    jacobian_stream,
    off_task_stream,
    uniform_stream,
)


def make_suite(store: MemoryBlobStore) -> DetectorSuite:
    task = digits_task()
    return DetectorSuite(
        [
            PradaDetector(PradaConfig(n_features=64, n_classes=5), store),
            DistributionDetector(
                DistributionConfig(n_features=64, n_classes=5),
                store,
                task.reference,
                reference_labels=task.predict(task.reference),
            ),
            VolumeDetector(VolumeConfig(), store),
        ]
    )


def cost(history: int, measured: int) -> None:
    task = digits_task()
    rng = np.random.default_rng(7)
    print(f"\n### CPU per request ({history:,} queries of history per account)\n")
    print(
        "| history stream | prada µs | distribution µs | volume µs | policy µs | "
        "audit append µs | total µs | state bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    policy = ResponsePolicy.default()
    for name, x in (
        (
            "honest (split B)",
            honest_stream(task.split_b, task.predict(task.split_b), history + measured, rng),
        ),
        ("uniform (worst case state)", uniform_stream(history + measured, rng)),
    ):
        labels = [int(v) for v in task.predict(x)]
        rows = list(x)
        store = MemoryBlobStore()
        suite = make_suite(store)
        for i in range(history):
            suite.observe_at_time("acct", "digits", rows[i], labels[i], now=float(i))
        size = store.total_bytes("detect/")
        per: dict[str, float] = {}
        for det in suite.detectors:
            t0 = time.process_time()
            for i in range(history, history + measured):
                det.observe_at_time("acct", "digits", rows[i], labels[i], now=float(i))
            per[det.name] = (time.process_time() - t0) / measured * 1e6
        scores = suite.observe_at_time("acct", "digits", rows[0], labels[0], now=0.0).scores
        t0 = time.process_time()
        for _ in range(measured):
            policy.decide_at_time(AccountStatus(), scores, now=1.0)
        per["policy"] = (time.process_time() - t0) / measured * 1e6
        with tempfile.TemporaryDirectory() as d:
            log = AuditLog.open(d, AuditKey.generate(), checkpoint_every=1000, now=0.0)
            flags = {
                "prada": 0.1,
                "distribution": 0.2,
                "volume": 0.0,
                "distribution.coverage_ratio": 0.95,
            }
            outputs = np.zeros(5, np.float32)
            t0 = time.process_time()
            for i in range(history, history + measured):
                log.append_query_at_time(
                    float(i),
                    account="acct",
                    model="digits",
                    input_sha256=digest_array(x[i]),
                    output_sha256=digest_array(outputs),
                    decision="ok",
                    flags=flags,
                )
            per["audit"] = (time.process_time() - t0) / measured * 1e6
            log.close_at_time(float(history + measured))
        total = sum(per.values())
        print(
            f"| {name} | {per['prada']:.0f} | {per['distribution']:.0f} | "
            f"{per['volume']:.0f} | {per['policy']:.0f} | {per['audit']:.0f} | "
            f"{total:.0f} | {size:,} |"
        )


def first_flag(
    suite: DetectorSuite, account: str, x: np.ndarray, rate: float
) -> tuple[int | None, str]:
    task = digits_task()
    labels = [int(v) for v in task.predict(x)]
    policy = ResponsePolicy.default()
    status = AccountStatus()
    for i in range(x.shape[0]):
        now = 1e6 + i * 3600.0 / rate
        result = suite.observe_at_time(account, "digits", x[i], labels[i], now=now)
        d = policy.decide_at_time(status, result.scores, now=now)
        if d.write:
            status = AccountStatus.make(d.status, expires_at=d.expires_at)
        if d.status >= Status.THROTTLED:
            top = result.top
            return i + 1, top.detector if top else "?"
    return None, "-"


def detection(seeds: int) -> None:
    task = digits_task()
    print("\n### Queries to detection (default thresholds; flagged = throttle or worse)\n")
    print(
        "| stream | runs | flagged | median queries | max queries | PRADA alone (median) |"
        " detector |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("uniform", "jacobian λ=1.6", "jacobian λ=0.8", "off-task (digits 5-9)"):
        results, prada_only, by = [], [], []
        for s in range(seeds):
            rng = np.random.default_rng(100 + s)
            if name == "uniform":
                x = uniform_stream(1000, rng)
            elif name.startswith("jacobian"):
                lam = 1.6 if "1.6" in name else 0.8
                seeds_x = task.split_a[rng.choice(task.split_a.shape[0], 10, replace=False)]
                t = task.__class__(
                    task.model, task.reference, task.split_a, task.split_b, task.off_task, seeds_x
                )
                x = jacobian_stream(t, 1000, lam=lam)
            else:
                x = off_task_stream(task, 1000, rng)
            at, det = first_flag(make_suite(MemoryBlobStore()), "att", x, 3600)
            results.append(at)
            by.append(det)
            store = MemoryBlobStore()
            only = DetectorSuite([PradaDetector(PradaConfig(n_features=64, n_classes=5), store)])
            prada_only.append(first_flag(only, "att", x, 3600)[0])
        hit = [r for r in results if r is not None]
        p_hit = [r for r in prada_only if r is not None]
        print(
            f"| {name} | {seeds} | {len(hit)}/{seeds} | "
            f"{statistics.median(hit) if hit else '-'} | {max(hit) if hit else '-'} | "
            f"{statistics.median(p_hit) if p_hit else 'never'} ({len(p_hit)}/{seeds}) | "
            f"{max(set(by), key=by.count)} |"
        )


def honest(accounts: int, queries: int) -> None:
    task = digits_task()
    print(f"\n### Honest accounts ({accounts} x {queries:,} queries, rates 20-900/h)\n")
    print(
        "| split | flagged accounts | max prada score | max distribution score | "
        "max volume score | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for split_name, pool in (("A (tuning)", task.split_a), ("B (test)", task.split_b)):
        labels_pool = task.predict(pool)
        rng = np.random.default_rng(99)
        store = MemoryBlobStore()
        suite = make_suite(store)
        policy = ResponsePolicy.default()
        flagged = 0
        maxima = {"prada": 0.0, "distribution": 0.0, "volume": 0.0}
        t0 = time.perf_counter()
        for a in range(accounts):
            x = honest_stream(pool, labels_pool, queries, rng)
            labels = [int(v) for v in task.predict(x)]
            rate = float(rng.uniform(20, 900))
            status = AccountStatus()
            hit = False
            for i in range(queries):
                now = 1e6 + i * 3600.0 / rate
                r = suite.observe_at_time(f"h{a}", "digits", x[i], labels[i], now=now)
                for sc in r.scores:
                    maxima[sc.detector] = max(maxima[sc.detector], sc.score)
                d = policy.decide_at_time(status, r.scores, now=now)
                if d.write:
                    status = AccountStatus.make(d.status, expires_at=d.expires_at)
                hit = hit or d.status >= Status.THROTTLED
            flagged += hit
        print(
            f"| {split_name} | {flagged}/{accounts} | {maxima['prada']:.2f} | "
            f"{maxima['distribution']:.2f} | {maxima['volume']:.2f} | "
            f"{time.perf_counter() - t0:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--history", type=int, default=10_000)
    ap.add_argument("--measured", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--skip-honest", action="store_true")
    args = ap.parse_args()
    print(f"## bench_detect ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    _ = sha256_hex  # digests are what the audit log stores
    cost(args.history, args.measured)
    detection(args.seeds)
    if not args.skip_honest:
        honest(args.accounts, args.queries)


if __name__ == "__main__":
    main()
