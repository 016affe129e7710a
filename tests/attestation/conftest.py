"""Vectors and a simulated platform shared by the attestation and enclave tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sealserve.attestation.snp_certs import load_amd_certificates
from tests.conftest import VECTORS

SNP = VECTORS / "sev-snp"
# Inside every vector's validity period, including the VLEK's (2024-12-10..2025-12-10).
NOW = datetime(2025, 6, 1, tzinfo=UTC)
EXPECTED: dict[str, dict[str, object]] = json.loads((VECTORS / "expected_fields.json").read_text())[
    "sev-snp"
]


def _first_pem(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return load_amd_certificates(path.read_bytes())[0].public_bytes(Encoding.DER)


# report (relative to VECTORS) -> its VCEK/VLEK (DER)
SIGNERS: dict[str, bytes] = {
    "sev-snp/go-sev-guest/attestation.bin": (SNP / "go-sev-guest/vcek.testcer").read_bytes(),
    "sev-snp/virtee-sev/report_milan.bin": (SNP / "virtee-sev/vcek_milan.der").read_bytes(),
    "sev-snp/trustee/test-report.bin": (SNP / "trustee/test-vcek.der").read_bytes(),
    "sev-snp/trustee/test-vlek-report.bin": (SNP / "trustee/test-vlek.der").read_bytes(),
    "sev-snp/trustee/az-snp-vtpm/hcl-report.snp.bin": _first_pem(
        SNP / "trustee/az-snp-vtpm/vcek.pem"
    ),
}


def read_vector(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()
