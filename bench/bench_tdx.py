"""Warm verification time of Intel TDX quotes, with and without full collateral, beside
one SEV-SNP report in the same run (ratios are what to read on a shared machine).

    PYTHONPATH=. python bench/bench_tdx.py [-n 300]
    python bench/record.py "Intel TDX verify, full collateral (issue 15)" -- python bench/bench_tdx.py

Cases (median and p95 over N runs after one warm-up run that loads the pinned roots):
an SEV-SNP report + VCEK chain; a TDX quote alone (chain, QE report, QE identity,
quote signature); the dcap-qvl quote with its complete, signed collateral already
parsed (CRLs, TCB-signing chain, both JSON signatures, QE identity, TCB level); the same
with the collateral JSON from the evidence (its parse cached by content, as the broker
and client do) and parsed afresh on every run; and dcap-qvl (Rust) on the same input
for reference. Targets: SNP <= 5 ms,
TDX with full collateral <= 10 ms warm.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

from bench.bench_attestation import measure
from sealserve.attestation.snp_certs import VCEK_GUID, CertTable, TrustedRoots
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_collateral import TdxCollateral

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "data" / "vectors"
SNP = VECTORS / "sev-snp" / "trustee"
TDX = VECTORS / "tdx"
SNP_NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)
TDX_NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
DCAP_NOW = datetime.datetime(2025, 6, 20, tzinfo=datetime.UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=300, help="timed runs per case")
    args = parser.parse_args()

    amd = TrustedRoots.amd()
    report = (SNP / "test-report.bin").read_bytes()
    certs = CertTable.build({VCEK_GUID: (SNP / "test-vcek.der").read_bytes()}).to_bytes()
    quote = (TDX / "go-tdx-guest" / "quote_v5_sample.dat").read_bytes()
    dcap_quote = (TDX / "dcap-qvl" / "tdx_quote").read_bytes()
    dcap_json = (TDX / "dcap-qvl" / "tdx_quote_collateral.json").read_bytes()
    collateral = TdxCollateral.from_dcap_json(dcap_json)

    def full_parsed() -> object:
        claims = verify_tdx_at_time(dcap_quote, now=DCAP_NOW, collateral=collateral)
        assert claims.fields["collateral_verified"] is True
        return claims

    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "SEV-SNP report + VCEK chain",
            lambda: verify_snp_at_time(report, roots=amd, now=SNP_NOW, cert_table=certs),
        ),
        ("TDX quote, no collateral", lambda: verify_tdx_at_time(quote, now=TDX_NOW)),
        ("TDX quote + full collateral (parsed once)", full_parsed),
        (
            "TDX quote + full collateral (JSON from the evidence, parse cached)",
            lambda: verify_tdx_at_time(
                dcap_quote, now=DCAP_NOW, collateral=TdxCollateral.from_dcap_json_cached(dcap_json)
            ),
        ),
        (
            "TDX quote + full collateral (JSON parsed each run)",
            lambda: verify_tdx_at_time(
                dcap_quote, now=DCAP_NOW, collateral=TdxCollateral.from_dcap_json(dcap_json)
            ),
        ),
    ]
    try:
        import dcap_qvl

        oracle = dcap_qvl.QuoteCollateralV3.from_json(dcap_json.decode())
        stamp = int(DCAP_NOW.timestamp())
        cases.append(
            (
                "dcap-qvl (Rust) quote + full collateral, reference",
                lambda: dcap_qvl.verify(dcap_quote, oracle, stamp),
            )
        )
    except ImportError:  # [dev] extra not installed: the reference row is left out
        pass

    base = None
    lines = [
        f"{args.n} runs per case, 2-core dev machine (shared: read the ratios).",
        "",
        "| case | first call ms | median ms | p95 ms | x SNP |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, fn in cases:
        cold, median, p95 = measure(fn, args.n)
        base = base or median
        lines.append(f"| {name} | {cold:.2f} | {median:.2f} | {p95:.2f} | {median / base:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
