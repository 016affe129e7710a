"""``sealserve verify --report``: an auditor's check of a raw hardware report.

The report is whatever the auditor was handed: a raw SEV-SNP report (1184 bytes, with
its VCEK/VLEK from ``--vcek``, a ``--cert-chain`` bundle or a ``--cert-table``), an
Azure HCL report (the SNP report Azure's paravisor stores in the vTPM, which binds the
vTPM attestation key; with ``--vtpm-bundle`` also the vTPM quote and PCRs of sealserve's
azure-vtpm evidence), or an Intel TDX quote (with ``--collateral`` in dcap-qvl's JSON
form). No report_data binding is assumed: ``--expect-report-data`` asks for one.
"""

from __future__ import annotations

import argparse
import datetime
import hmac
from pathlib import Path
from typing import Any

from sealserve.attestation.claims import Check, Claims, Platform, Policy
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.errors import ConfigError, VerificationError

MAX_INPUT = 1 << 20
PLATFORMS = ("auto", "sev-snp", "azure-hcl", "tdx")
_SNP_LEAF_NAMES = ("SEV-VCEK", "SEV-VLEK")


def add_raw_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raw report (--report)")
    g.add_argument(
        "--platform", choices=PLATFORMS, default="auto",
        help="what --report holds (default: auto: TDX quote, Azure HCL report or SEV-SNP "
        "report, by its layout)",
    )  # fmt: skip
    g.add_argument("--vcek", type=Path, help="SEV-SNP: the VCEK/VLEK (DER or PEM)")
    g.add_argument(
        "--cert-chain", type=Path,
        help="SEV-SNP: PEM bundle (VCEK/VLEK and/or ASK, ARK); its CA certificates must "
        "be the trusted ones",
    )  # fmt: skip
    g.add_argument("--cert-table", type=Path, help="SEV-SNP: certificate table (auxblob)")
    g.add_argument(
        "--collateral", type=Path,
        help="TDX: collateral JSON (dcap-qvl QuoteCollateralV3 form: TCB info, QE identity, "
        "their signatures and issuer chains, both CRLs)",
    )  # fmt: skip
    g.add_argument(
        "--vtpm-bundle", type=Path,
        help="Azure HCL report: the vTPM quote bundle that came with it (sealserve "
        "azure-vtpm evidence); verifies the quote, the PCRs and the user-data binding",
    )  # fmt: skip
    g.add_argument(
        "--expect-report-data", metavar="HEX",
        help="require REPORT_DATA to equal this (up to 64 bytes, zero-padded)",
    )  # fmt: skip


def parse_time(value: str | None) -> datetime.datetime:
    """``--at``: an ISO 8601 time (a zone is required), or now. Raises ConfigError."""
    if value is None:
        return datetime.datetime.now(datetime.UTC)
    try:
        at = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--at: {value[:40]!r} is not an ISO 8601 time") from exc
    if at.tzinfo is None:
        raise ConfigError(f"--at: {value[:40]!r} has no time zone (add Z or +00:00)")
    return at.astimezone(datetime.UTC)


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_INPUT:
        raise ConfigError(f"{what}: {path} is over {MAX_INPUT} bytes")
    return data


def detect(report: bytes) -> str:
    """Guess what a raw report is from its first bytes."""
    from sealserve.attestation.azure_hcl import HclReport
    from sealserve.attestation.tdx_quote import TEE_TYPE_TDX

    if HclReport.looks_like(report):
        return "azure-hcl"
    if (
        len(report) >= 8
        and int.from_bytes(report[:2], "little") in (4, 5)
        and int.from_bytes(report[4:8], "little") == TEE_TYPE_TDX
    ):
        return "tdx"
    return "sev-snp"


def _snp_signer(args: argparse.Namespace, roots: TrustedRoots) -> tuple[bytes | None, Check | None]:
    """The VCEK/VLEK from --vcek or --cert-chain; the chain's CA certificates must be
    ones the roots already hold (a bundle cannot bring its own trust anchor)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from sealserve.attestation.snp_certs import load_amd_certificates
    from sealserve.attestation.x509names import common_name

    signer = _read(args.vcek, "--vcek") if args.vcek is not None else None
    if args.cert_chain is None:
        return signer, None
    trusted = {
        c.public_bytes(Encoding.DER)
        for s in roots.sets
        for c in (s.ark, s.ask, s.asvk)
        if c is not None
    }
    cas = []
    for cert in load_amd_certificates(_read(args.cert_chain, "--cert-chain")):
        name = common_name(cert.subject)
        if name in _SNP_LEAF_NAMES:
            if signer is None:
                signer = cert.public_bytes(Encoding.DER)
            continue
        if cert.public_bytes(Encoding.DER) not in trusted:
            raise VerificationError(
                f"cert_chain: '{name}' in --cert-chain is not one of the trusted AMD "
                "certificates (a chain cannot bring its own root)",
                check="cert_chain",
            )
        cas.append(name)
    return signer, Check("cert_chain", True, f"CA certificates are the trusted ones: {cas}")


def verify_raw(
    args: argparse.Namespace, *, policy: Policy, roots: TrustedRoots
) -> tuple[Claims, list[Check]]:
    """Verify ``args.report`` as of ``--at``; returns the claims and the checks made
    here. Raises AttestationError (``check`` names the failed step) or ConfigError."""
    from sealserve.attestation.evidence import verify_report_at_time

    report = _read(args.report, "--report")
    now = parse_time(args.at)
    kind = detect(report) if args.platform == "auto" else args.platform
    checks = [Check("input", None, f"{kind} report, {len(report)} bytes, verified at {now}")]
    if args.vtpm_bundle is not None and kind != "azure-hcl":
        raise ConfigError(f"--vtpm-bundle goes with an Azure HCL report; this is {kind}")
    if kind in ("sev-snp", "azure-hcl"):
        if args.collateral is not None:
            raise ConfigError("--collateral is for TDX quotes; this is an SEV-SNP report")
        signer, chain_check = _snp_signer(args, roots)
        if chain_check is not None:
            checks.append(chain_check)
        table = _read(args.cert_table, "--cert-table") if args.cert_table else b""
        if kind == "azure-hcl" and args.vtpm_bundle is not None:
            from sealserve.attestation.azure_vtpm import verify_azure_vtpm_at_time

            if signer is not None or table:
                raise ConfigError("--vtpm-bundle carries the VCEK chain; drop --vcek/--cert-*")
            bundle = _read(args.vtpm_bundle, "--vtpm-bundle")
            claims = verify_azure_vtpm_at_time(report, bundle, roots=roots, now=now)
        elif kind == "azure-hcl":
            from sealserve.attestation.azure_hcl import verify_azure_hcl_at_time

            claims = verify_azure_hcl_at_time(
                report, roots=roots, now=now, signer_cert=signer, cert_table=table
            )
        else:
            from sealserve.attestation.snp_verify import verify_snp_at_time

            claims = verify_snp_at_time(
                report, roots=roots, now=now, signer_cert=signer, cert_table=table
            )
    else:
        if args.vcek or args.cert_chain or args.cert_table:
            raise ConfigError("--vcek/--cert-chain/--cert-table are for SEV-SNP reports")
        collateral = None
        if args.collateral is not None:
            from sealserve.attestation.tdx_collateral import TdxCollateral

            collateral = TdxCollateral.from_dcap_json(_read(args.collateral, "--collateral"))
        claims = verify_report_at_time(
            Platform.TDX, report, roots=roots, now=now, tdx_collateral=collateral
        )
    if args.expect_report_data is not None:
        checks.append(_report_data(claims, args.expect_report_data))
    else:
        checks.append(Check("report_data_binding", None, "not checked: raw report (not asked)"))
    return claims, checks


def _report_data(claims: Claims, expected_hex: str) -> Check:
    try:
        expected = bytes.fromhex(expected_hex)
    except ValueError as exc:
        raise ConfigError(
            f"--expect-report-data: not hex ({expected_hex[:16]!r}, {len(expected_hex)} chars)"
        ) from exc
    if len(expected) > 64:
        raise ConfigError(f"--expect-report-data: {len(expected)} bytes, at most 64")
    if not hmac.compare_digest(expected.ljust(64, b"\0"), claims.report_data):
        raise VerificationError(
            f"report_data: REPORT_DATA {claims.report_data.hex()[:32]}... is not the "
            "expected value",
            check="report_data",
        )
    return Check("report_data", True, "REPORT_DATA equals the expected value")


def claims_dict(claims: Claims) -> dict[str, Any]:
    return {
        "platform": claims.platform.value,
        "simulated": claims.simulated,
        "debug": claims.debug,
        "measurements": {k: v.hex() for k, v in claims.measurements.items()},
        "report_data": claims.report_data.hex(),
        "manifest_digest": claims.manifest_digest.hex() if claims.manifest_digest else None,
        "fields": dict(claims.fields),
    }
