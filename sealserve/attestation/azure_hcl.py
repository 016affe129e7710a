"""Azure confidential VMs (SEV-SNP behind Azure's paravisor): the HCL report.

An Azure CVM's guest cannot ask the PSP for a report itself; the paravisor (HCL) does,
and stores the result in a vTPM NV index (0x01400001) as an HCL report::

    header (32)            "HCLA", version u32, report size u32, request type u32,
                           status u32, reserved [12]
    SEV-SNP report (1184)  its REPORT_DATA[0:32] = SHA-256(runtime data)
    IGVM request data      data size u32, version u32, report type u32 (2 = SNP),
                           hash type u32 (1 = SHA-256, 2 = SHA-384, 3 = SHA-512),
                           runtime data size u32, runtime data (JSON: the vTPM's
                           attestation key "HCLAkPub" and encryption key, VM config)
    padding to the NV index size (not covered by anything; ignored)

Verifying it: 1 parse; 2 the SNP report with its VCEK (``verify_snp_at_time``); 3 the
hash of the runtime data equals REPORT_DATA (the rest zero), which binds the vTPM
attestation key the runtime data carries to the hardware report. Quotes that vTPM key
signs can then be trusted as coming from this VM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sealserve.attestation.claims import Check, Claims
from sealserve.attestation.snp import REPORT_SIZE
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.errors import EvidenceFormatError, VerificationError

HCL_MAGIC = b"HCLA"
HEADER_SIZE = 32
REQUEST_DATA_HEADER = 20
REPORT_TYPE_SNP = 2
_HASHES = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}
MAX_RUNTIME_DATA = 64 * 1024


def _bad(message: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"HCL report: {message}", check="hcl_format")


@dataclass(frozen=True)
class HclReport:
    """A parsed Azure HCL report: the SNP report and the runtime data it binds."""

    version: int
    snp_report: bytes
    hash_type: int
    runtime_data: bytes
    trailing: int

    @staticmethod
    def looks_like(data: bytes) -> bool:
        return data[:4] == HCL_MAGIC

    @classmethod
    def from_bytes(cls, data: bytes) -> HclReport:
        """Parse. Raises EvidenceFormatError (``check="hcl_format"``)."""
        data = bytes(data)
        if len(data) < HEADER_SIZE + REPORT_SIZE + REQUEST_DATA_HEADER:
            raise _bad(f"{len(data)} bytes is too short")
        if data[:4] != HCL_MAGIC:
            raise _bad(f"wrong magic {data[:4].hex()} (expected 'HCLA')")
        version, size, _request_type, _status = struct.unpack_from("<IIII", data, 4)
        if size > len(data):
            raise _bad(f"report size {size} exceeds the {len(data)} bytes given")
        snp = data[HEADER_SIZE : HEADER_SIZE + REPORT_SIZE]
        pos = HEADER_SIZE + REPORT_SIZE
        data_size, _rd_version, report_type, hash_type, runtime_size = struct.unpack_from(
            "<IIIII", data, pos
        )
        if report_type != REPORT_TYPE_SNP:
            raise _bad(f"report type {report_type} is not SEV-SNP (2)")
        if hash_type not in _HASHES:
            raise _bad(f"unknown runtime data hash type {hash_type}")
        start = pos + REQUEST_DATA_HEADER
        if runtime_size > MAX_RUNTIME_DATA or start + runtime_size > size:
            raise _bad(f"runtime data size {runtime_size} does not fit the report size {size}")
        if data_size != REQUEST_DATA_HEADER + runtime_size:
            raise _bad(f"request data size {data_size} != 20 + runtime data size {runtime_size}")
        return cls(
            version=version,
            snp_report=snp,
            hash_type=hash_type,
            runtime_data=data[start : start + runtime_size],
            trailing=len(data) - (start + runtime_size),
        )

    def runtime_claims(self) -> dict[str, Any]:
        """The runtime data as JSON. Raises EvidenceFormatError."""
        try:
            claims = json.loads(self.runtime_data)
        except ValueError as exc:
            raise _bad(f"runtime data is not JSON ({exc})") from exc
        if not isinstance(claims, dict):
            raise _bad("runtime data is not a JSON object")
        return claims


def _vtpm_key(runtime: dict[str, Any]) -> dict[str, Any] | None:
    for key in runtime.get("keys", []) or []:
        if isinstance(key, dict) and key.get("kid") == "HCLAkPub":
            return key
    return None


def verify_azure_hcl_at_time(
    raw: bytes,
    *,
    roots: TrustedRoots,
    now: datetime,
    signer_cert: bytes | None = None,
    cert_table: bytes = b"",
    cache_dir: str | Path | None = None,
) -> Claims:
    """Verify an Azure HCL report (see the module docstring) as of ``now``.

    Returns the SNP report's claims plus ``fields["vtpm_ak_pub"]`` (the vTPM attestation
    key, a JWK) and ``fields["hcl_runtime_data_sha256"]``. Raises EvidenceFormatError or
    VerificationError (``check`` names the step; ``hcl_runtime_binding`` when the
    runtime data is not the one the SNP report binds).
    """
    # 1. parse
    hcl = HclReport.from_bytes(raw)
    # 2. the SNP report and its chain
    claims = verify_snp_at_time(
        hcl.snp_report,
        roots=roots,
        now=now,
        signer_cert=signer_cert,
        cert_table=cert_table,
        cache_dir=cache_dir,
    )
    # 3. REPORT_DATA = hash(runtime data), zero-padded
    digest = _HASHES[hcl.hash_type](hcl.runtime_data).digest()
    expected = digest.ljust(64, b"\0")
    if not hmac.compare_digest(expected, claims.report_data):
        raise VerificationError(
            "hcl_runtime_binding: the SNP report's REPORT_DATA is not the hash of the HCL "
            "runtime data (the vTPM key it carries is not bound to this report)",
            check="hcl_runtime_binding",
        )
    runtime = hcl.runtime_claims()
    ak = _vtpm_key(runtime)
    if ak is None:
        raise _bad("runtime data carries no HCLAkPub (vTPM attestation key)")
    checks = [
        Check("hcl_format", True, f"HCL report v{hcl.version}, {hcl.trailing} padding bytes"),
        *claims.checks,
        Check(
            "hcl_runtime_binding",
            True,
            f"REPORT_DATA = {_HASHES[hcl.hash_type]().name}(runtime data): "
            "vTPM attestation key HCLAkPub bound",
        ),
    ]
    return dataclasses.replace(
        claims,
        checks=tuple(checks),
        fields={
            **claims.fields,
            "hcl_runtime_data_sha256": hashlib.sha256(hcl.runtime_data).hexdigest(),
            "vtpm_ak_pub": ak,
            "hcl_vm_configuration": runtime.get("vm-configuration"),
        },
    )
