"""Warm-cache verification time of one SEV-SNP report with its chain.

    PYTHONPATH=. python bench/bench_attestation.py [-n 500]

Prints a markdown table (median and p95 over N runs, after one warm-up run that fills
the per-process certificate caches). Target: <= 5 ms per genuine report + chain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sealserve.attestation.evidence import verify_evidence_at_time
from sealserve.attestation.policy import UnsafeAllowSimulated, UnsafePolicyWarning
from sealserve.attestation.snp_certs import VCEK_GUID, CertTable, TrustedRoots
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vectors" / "sev-snp"


def measure(fn: Callable[[], object], n: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    fn()  # cold: fills the caches
    cold = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return cold, statistics.median(times), times[int(0.95 * (n - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="timed runs per case")
    args = parser.parse_args()

    amd = TrustedRoots.amd()
    report = (VECTORS / "trustee" / "test-report.bin").read_bytes()
    table = CertTable.build({VCEK_GUID: (VECTORS / "trustee" / "test-vcek.der").read_bytes()})
    certs = table.to_bytes()
    genuine_now = datetime(2025, 6, 1, tzinfo=UTC)

    def genuine() -> object:
        return verify_snp_at_time(report, roots=amd, now=genuine_now, cert_table=certs)

    rows = [("genuine Milan report + VCEK chain (verify_snp_at_time)", *measure(genuine, args.n))]

    with tempfile.TemporaryDirectory() as tmp:
        root = SimulatedPlatform.create_root(Path(tmp) / "sim")
        platform = SimulatedPlatform(root)
        roots = amd + TrustedRoots.from_dir(root)
        nonce = os.urandom(32)
        ev = attest(platform, nonce=nonce, tls_spki=b"spki", manifest=b"{}", hpke_public_key=b"k")
        now = datetime.now(UTC)

        def simulated() -> object:
            return verify_snp_at_time(ev.report, roots=roots, now=now, cert_table=ev.certs)

        def evidence() -> object:
            return verify_evidence_at_time(
                ev, policy=UnsafeAllowSimulated(), roots=roots, expected_nonce=nonce, now=now
            )

        rows.append(("simulated report + chain (verify_snp_at_time)", *measure(simulated, args.n)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsafePolicyWarning)
            rows.append(
                (
                    "simulated Evidence end to end (verify_evidence_at_time)",
                    *measure(evidence, args.n),
                )
            )
        rows.append(
            (
                "simulated report generation (SimulatedPlatform.report)",
                *measure(lambda: platform.report(bytes(64)), args.n),
            )
        )

    print(f"| case (N={args.n}) | cold ms | median ms | p95 ms |")
    print("|---|---:|---:|---:|")
    for name, cold, median, p95 in rows:
        print(f"| {name} | {cold:.2f} | {median:.3f} | {p95:.3f} |")


if __name__ == "__main__":
    main()
