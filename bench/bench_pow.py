"""Calibration of proof-of-work challenges (issue 16, "challenges with teeth").

Measures the SDK's solver (sealserve.defense.challenge.solve, SHA-256 in Python) on
this machine and turns it into the cost of a row: a challenged row costs
``2**(base + repeat_bits * episodes)`` hashes on average (row_bits(rows) more bits per
request of ``rows`` rows, i.e. the same per row), against ``--row-us`` of serving
work per row (default: the defended server's in-process cost per batch-1 request in
bench/RESULTS.md, "Defense layer inside the server", memory store).

    python bench/bench_pow.py [--bits 10] [--n 40] [--row-us 555]
"""

from __future__ import annotations

import argparse
import statistics
import time

from sealserve.defense.challenge import Challenges, row_bits, solve
from sealserve.defense.status import DEFAULT_DIFFICULTY
from sealserve.defense.store.memory import MemoryStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bits", type=int, default=10, help="difficulty measured")
    p.add_argument("--n", type=int, default=40, help="challenges solved")
    p.add_argument("--row-us", type=float, default=555.0, help="serving cost of one row")
    args = p.parse_args()
    c = Challenges(Challenges.generate_key(), MemoryStore(), ttl_s=3600)
    per_hash = []
    for _ in range(args.n):
        ch = c.issue("bench", args.bits, now=time.time())
        t0 = time.perf_counter()
        sol = solve(ch)
        dt = time.perf_counter() - t0
        per_hash.append(dt / (int(sol) + 1))
    t_hash = statistics.median(per_hash)
    print(
        f"solver: {t_hash * 1e6:.2f} µs per SHA-256 try (median over {args.n} "
        f"{args.bits}-bit challenges); serving cost {args.row_us:.0f} µs per row\n"
    )
    print(
        "| account | difficulty per row (bits) | expected µs of work per row | "
        "cost vs unchallenged |"
    )
    print("|---|---:|---:|---:|")
    rows = [("honest, never challenged (honest-stream tests)", None)]
    rows += [
        (
            f"challenged, {k} earlier episode(s), default base {DEFAULT_DIFFICULTY}",
            DEFAULT_DIFFICULTY + 2 * k,
        )
        for k in range(0, 4)
    ]
    rows += [(f"challenged, {k} earlier episode(s), base 9", 9 + 2 * k) for k in range(0, 5)]
    for name, bits in rows:
        work = 0.0 if bits is None else (2.0**bits) * t_hash * 1e6
        ratio = (args.row_us + work) / args.row_us
        print(f"| {name} | {'-' if bits is None else bits} | {work:,.0f} | {ratio:,.1f}x |")
    print(
        f"\nA request of R rows carries row_bits(R) more bits (e.g. {row_bits(32)} for 32 "
        f"rows, {row_bits(4096)} for 4096), so the work per row does not fall with "
        "batching. 2-core dev machine; the SDK's solver is pure Python, a native "
        "solver is ~20-50x faster, which divides every work figure above."
    )


if __name__ == "__main__":
    main()
