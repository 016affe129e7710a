"""Helpers for the TDX tests: vector paths, a fixed clock, and a quote re-assembler
for building negative cases (cut chains, broken bindings) from genuine quotes."""

from __future__ import annotations

import datetime
import json
import struct
from pathlib import Path
from typing import Any

from sealserve.attestation.tdx_quote import TdxQuote

VECTORS = Path(__file__).resolve().parent.parent / "data" / "vectors"
TDX = VECTORS / "tdx"
GO = TDX / "go-tdx-guest"
TRUSTEE = TDX / "trustee"
# A genuine quote with complete signed collateral (Phala-Network/dcap-qvl, MIT).
DCAP = TDX / "dcap-qvl"
DCAP_QUOTE = DCAP / "tdx_quote"
DCAP_COLLATERAL = DCAP / "tdx_quote_collateral.json"
EXPECTED: dict[str, dict[str, Any]] = json.loads((VECTORS / "expected_fields.json").read_text())[
    "tdx"
]
GENUINE = sorted(EXPECTED)
TAMPERED = [name.replace(".dat", ".tampered.bin") for name in GENUINE]
# Inside every PCK chain's validity (leaves from 2022-09 .. 2026-01 to 2029 ..).
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
# Inside the go-tdx-guest collateral's window (TCB info, QE identity, both CRLs).
NOW_2023 = datetime.datetime(2023, 7, 1, 1, tzinfo=datetime.UTC)
# Inside every window of the dcap-qvl collateral: after the latest issueDate / CRL
# thisUpdate (QE identity, 2025-06-19T10:32:27Z), before the earliest nextUpdate (PCK
# CRL, 2025-07-19T10:00:35Z).
NOW_DCAP = datetime.datetime(2025, 6, 20, tzinfo=datetime.UTC)
# Inside sample_tcbinfo_response_v5's window.
NOW_2026_02 = datetime.datetime(2026, 2, 10, tzinfo=datetime.UTC)


def raw(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def rebuild(
    quote_bytes: bytes, *, pck_chain_pem: bytes | None = None, qe_auth_data: bytes | None = None
) -> bytes:
    """Re-assemble a quote with a replaced PCK chain or QE auth data (sizes fixed up).

    Neither part is covered by the quote signature nor the QE report signature, so the
    other checks still pass and the one under test is the one that fails.
    """
    q = TdxQuote.from_bytes(quote_bytes)
    pem = q.pck_chain_pem if pck_chain_pem is None else pck_chain_pem
    auth = q.qe_auth_data if qe_auth_data is None else qe_auth_data
    inner = struct.pack("<HI", 5, len(pem)) + pem
    cert = q.qe_report.raw + q.qe_report_signature + struct.pack("<H", len(auth)) + auth + inner
    sig = q.quote_signature + q.attestation_key + struct.pack("<HI", 6, len(cert)) + cert
    return q.signed_data + struct.pack("<I", len(sig)) + sig


def pem_blocks(pem: bytes) -> list[bytes]:
    """Split a PEM bundle into its certificate blocks."""
    end = b"-----END CERTIFICATE-----\n"
    text = pem.rstrip(b"\x00")
    return [block + end for block in text.split(end) if block.strip()]
