"""Time warm TDX quote verification (median of N runs).

    PYTHONPATH=. python bench/bench_tdx.py [--runs 200] [--quote PATH] [--collateral]

"Warm" means the pinned Intel root is already loaded and checked (first call); each
timed run then parses the quote, validates the PCK chain, and checks the QE report,
the binding and the quote signature. With --collateral the go-tdx-guest v5 TCB info is
evaluated too (quote_v5_sample.dat at a fixed time inside the collateral's window).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_collateral import TcbInfo, TdxCollateral

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vectors" / "tdx"
DEFAULT_QUOTE = VECTORS / "go-tdx-guest" / "quote_v5_sample.dat"
NOW = datetime.datetime(2026, 2, 10, tzinfo=datetime.UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--quote", type=Path, default=DEFAULT_QUOTE)
    parser.add_argument("--collateral", action="store_true")
    args = parser.parse_args()
    raw = args.quote.read_bytes()
    collateral = None
    if args.collateral:
        info = TcbInfo.from_json(VECTORS / "go-tdx-guest" / "sample_tcbinfo_response_v5")
        collateral = TdxCollateral(tcb_info=info)
    cold_start = time.perf_counter()
    verify_tdx_at_time(raw, now=NOW, collateral=collateral)
    cold = time.perf_counter() - cold_start
    samples = []
    for _ in range(args.runs):
        start = time.perf_counter()
        verify_tdx_at_time(raw, now=NOW, collateral=collateral)
        samples.append(time.perf_counter() - start)
    samples.sort()
    p90 = samples[int(0.9 * (len(samples) - 1))]
    print(
        f"tdx verify {args.quote.name} collateral={args.collateral} runs={args.runs}: "
        f"median {statistics.median(samples) * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms, "
        f"first call {cold * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
