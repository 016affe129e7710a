"""Azure confidential VMs as a sealserve platform (``azure-vtpm``): HCL report + vTPM quote.

On an Azure SEV-SNP CVM the guest runs above Azure's paravisor (HCL) and cannot ask
the PSP for a report. What it can do, through its vTPM:

1. write 64 bytes of its own to NV index 0x01400002: the paravisor then makes a fresh
   SEV-SNP report and stores it, as an HCL report, in NV index 0x01400001. The HCL
   report's runtime data carries those bytes as ``user-data`` (hex) beside the vTPM's
   attestation key ``HCLAkPub``, and the SNP report's REPORT_DATA is the hash of the
   runtime data (``sealserve.attestation.azure_hcl``);
2. ask the vTPM for a quote of its SHA-256 PCRs with that attestation key.

The SNP MEASUREMENT covers only the paravisor (Azure's firmware): the guest's own boot
(firmware, boot loader, kernel, initrd, command line) is measured into the vTPM's
PCRs. So the evidence is the HCL report (``Evidence.report``) plus a bundle
(``Evidence.certs``, JSON, :class:`VtpmBundle`) holding the quote, its signature, the
PCR values and the VCEK chain. Verifying it:

1 the bundle parses; 2 the HCL report, its SNP report and VCEK chain, and the runtime
data binding (``verify_azure_hcl_at_time``); 3 ``user-data`` is 64 bytes: it is this
evidence's REPORT_DATA (the sealserve binding of nonce, TLS key, manifest, HPKE key
and runtime keys is checked on it as on any platform); 4 the quote is signed by the
bound ``HCLAkPub``, covers the PCR values given, and its ``extraData`` is
SHA-256(REPORT_DATA), so the PCRs are as fresh as the nonce.

Claims: ``measurement`` (the paravisor's SNP launch measurement) and ``pcr0`` ..
``pcr23`` (SHA-256 bank) in ``measurements``; the SNP fields (TCB, policy, VMPL) in
``fields``. A simulated SNP chain stays ``simulated-sev-snp``, never ``azure-vtpm``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sealserve.attestation.azure_hcl import HclReport, verify_azure_hcl_at_time
from sealserve.attestation.claims import Check, Claims, Platform
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tpm_quote import PCR_COUNT, rsa_key_from_jwk, verify_quote
from sealserve.errors import EvidenceFormatError, VerificationError

BUNDLE_FORMAT = "sealserve-azure-vtpm"
BUNDLE_VERSION = 1
# The NV indices and key handle Azure's paravisor provides (Azure CVM documentation).
HCL_REPORT_INDEX = 0x01400001
REPORT_DATA_INDEX = 0x01400002
AK_HANDLE = 0x81000003
_VCEK_NAMES = ("SEV-VCEK", "SEV-VLEK")


def _bad(message: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"azure-vtpm bundle: {message}", check="vtpm_format")


def quote_nonce(report_data: bytes) -> bytes:
    """The quote's ``extraData`` for evidence with ``report_data``: SHA-256 of it (32
    bytes fit every TPM's qualifying-data limit)."""
    return hashlib.sha256(report_data).digest()


@dataclass(frozen=True)
class VtpmBundle:
    """What travels in ``Evidence.certs`` beside the HCL report."""

    quote: bytes
    signature: bytes
    pcrs: Mapping[int, bytes]
    vcek_chain: bytes = b""  # PEM: VCEK (or VLEK), optionally ASK and ARK

    def to_bytes(self) -> bytes:
        doc = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "quote": self.quote.hex(),
            "signature": self.signature.hex(),
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "vcek_chain": self.vcek_chain.decode("ascii"),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> VtpmBundle:
        """Parse. Raises EvidenceFormatError (``check="vtpm_format"``)."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise _bad("not JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise _bad(f"not a {BUNDLE_FORMAT} bundle")
        if doc.get("version") != BUNDLE_VERSION:
            raise _bad(f"unsupported version {str(doc.get('version'))[:10]!r}")
        unknown = set(doc) - {"format", "version", "quote", "signature", "pcrs", "vcek_chain"}
        if unknown:
            raise _bad(f"unknown keys {sorted(unknown)[:5]}")
        pcrs = doc.get("pcrs")
        if not isinstance(pcrs, dict):
            raise _bad("pcrs is not a table")
        values: dict[int, bytes] = {}
        for name, value in pcrs.items():
            if not (re.fullmatch("[0-9]{1,2}", name) and int(name) < PCR_COUNT):
                raise _bad(f"PCR index {name[:10]!r} is not 0..{PCR_COUNT - 1}")
            values[int(name)] = _hex(value, f"pcrs.{name}")
        chain = doc.get("vcek_chain", "")
        if not isinstance(chain, str) or not chain.isascii():
            raise _bad("vcek_chain is not PEM text")
        return cls(
            quote=_hex(doc.get("quote"), "quote"),
            signature=_hex(doc.get("signature"), "signature"),
            pcrs=values,
            vcek_chain=chain.encode("ascii"),
        )


def _hex(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{where} is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise _bad(f"{where} is not hex") from exc


def _signer(chain: bytes) -> bytes | None:
    """The VCEK/VLEK from a PEM bundle (its CA certificates are not trusted from here:
    the chain is checked against the relying party's roots)."""
    if not chain:
        return None
    from cryptography.hazmat.primitives.serialization import Encoding

    from sealserve.attestation.snp_certs import load_amd_certificates
    from sealserve.attestation.x509names import common_name

    certs = load_amd_certificates(chain)
    if not certs:
        raise _bad("vcek_chain holds no certificate")
    # The VCEK/VLEK by name, else the first certificate (THIM puts the VCEK first); the
    # SNP verifier then checks it against the ASK of a trusted root.
    named = [c for c in certs if common_name(c.subject) in _VCEK_NAMES]
    return (named or certs)[0].public_bytes(Encoding.DER)


def user_data(hcl: HclReport) -> bytes:
    """The 64 bytes the guest wrote to NV index 0x01400002, from the runtime data.
    Raises EvidenceFormatError (``check="vtpm_user_data"``)."""
    value = hcl.runtime_claims().get("user-data")
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        data = b""
    if len(data) != 64:
        raise EvidenceFormatError(
            "vtpm_user_data: the HCL runtime data carries no 64-byte user-data (the "
            "report was not requested with sealserve's REPORT_DATA)",
            check="vtpm_user_data",
        )
    return data


def verify_azure_vtpm_at_time(
    report: bytes,
    bundle: bytes,
    *,
    roots: TrustedRoots,
    now: datetime,
    cache_dir: str | Path | None = None,
) -> Claims:
    """Verify ``azure-vtpm`` evidence parts (the HCL report and the bundle) as of
    ``now``; see the module docstring. Raises EvidenceFormatError or
    VerificationError (``check`` names the step)."""
    # 1. the bundle
    parts = VtpmBundle.from_bytes(bundle)
    # 2. HCL report, SNP report and chain, runtime data binding
    hcl_claims = verify_azure_hcl_at_time(
        report, roots=roots, now=now, signer_cert=_signer(parts.vcek_chain), cache_dir=cache_dir
    )
    # The paravisor asks for its report at VMPL 0; a report from a less privileged
    # level of the same VM has the same MEASUREMENT but could bind a key of its own.
    if hcl_claims.fields.get("vmpl") != 0:
        raise VerificationError(
            f"vtpm_vmpl: the SNP report was requested at VMPL {hcl_claims.fields.get('vmpl')}, "
            "not by the paravisor (VMPL 0)",
            check="vtpm_vmpl",
        )
    # 3. user-data is REPORT_DATA
    report_data = user_data(HclReport.from_bytes(report))
    # 4. the quote: signed by the bound vTPM key, over these PCRs, answering REPORT_DATA
    key = rsa_key_from_jwk(hcl_claims.fields["vtpm_ak_pub"])
    quote = verify_quote(parts.quote, parts.signature, key=key, pcrs=parts.pcrs)
    if not hmac.compare_digest(quote.extra_data, quote_nonce(report_data)):
        raise VerificationError(
            "tpm_quote_nonce: the quote answers another request (extraData is not "
            "SHA-256 of this evidence's REPORT_DATA)",
            check="tpm_quote_nonce",
        )
    checks = [
        *hcl_claims.checks,
        Check("vtpm_user_data", True, "HCL user-data is this evidence's REPORT_DATA"),
        Check("tpm_quote_signature", True, "quote signed by the bound vTPM key HCLAkPub"),
        Check("tpm_pcr_digest", True, f"PCRs {sorted(parts.pcrs)} (SHA-256) are the quoted ones"),
        Check("tpm_quote_nonce", True, "extraData = SHA-256(REPORT_DATA)"),
    ]
    genuine = hcl_claims.platform is Platform.SEV_SNP
    pcrs = {f"pcr{i}": v for i, v in sorted(parts.pcrs.items())}
    return dataclasses.replace(
        hcl_claims,
        platform=Platform.AZURE_VTPM if genuine else hcl_claims.platform,
        report_data=report_data,
        measurements={"measurement": hcl_claims.measurements["measurement"], **pcrs},
        checks=tuple(checks),
        fields={
            **hcl_claims.fields,
            "paravisor_report_data": hcl_claims.report_data.hex(),
            "pcrs": {k: v.hex() for k, v in pcrs.items()},
            "tpm_clock": quote.clock,
            "tpm_reset_count": quote.reset_count,
            "tpm_restart_count": quote.restart_count,
        },
    )
