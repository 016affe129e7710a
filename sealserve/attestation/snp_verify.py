"""Verify an SEV-SNP report and its certificate chain into :class:`Claims`.

The same code checks genuine AMD reports (against ``TrustedRoots.amd()``) and
simulated ones (against a local root the caller passes explicitly); the platform in
the claims says which (``SEV_SNP`` or ``SIMULATED_SNP``). Verifiers never decide
trust: policies do (``sealserve.attestation.policy``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealserve.attestation.claims import Check, Claims, Platform
from sealserve.attestation.snp import Product, SigningKey, SnpReport, TcbLayout
from sealserve.attestation.snp_certs import (
    VCEK_GUID,
    VLEK_GUID,
    CertTable,
    TrustedRoots,
    amd_extensions,
    find_cached_vcek,
    hwid_matches,
    load_amd_certificate,
    require_signed_by,
    require_valid_at,
)
from sealserve.attestation.x509names import common_name
from sealserve.errors import VerificationError


def verify_snp_at_time(
    report: bytes,
    *,
    roots: TrustedRoots,
    now: datetime,
    cert_table: bytes = b"",
    signer_cert: bytes | None = None,
    cache_dir: str | Path | None = None,
) -> Claims:
    """Verify ``report`` and its chain as of ``now``; return the claims.

    The VCEK/VLEK is taken from ``signer_cert`` (DER or PEM), else from ``cert_table``
    (the kernel's auxblob format), else from ``cache_dir``. Steps (AMD SEV-SNP ABI and
    VCEK specs): 1 parse; 2 find the signing certificate; 3 ARK self-signed; 4 ASK/ASVK
    signed by ARK; 5 VCEK/VLEK signed by ASK/ASVK; 6 validity at ``now``; 7 product line;
    8 VCEK TCB == REPORTED_TCB; 9 hwID == CHIP_ID; 10 report signature.

    Raises EvidenceFormatError (unparseable report or certificates) or
    VerificationError, each with ``check`` naming the failed step.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    checks: list[Check] = []
    # 1. parse
    parsed = SnpReport.from_bytes(report)
    checks.append(Check("report_format", True, f"version {parsed.version}, 1184 bytes"))
    if parsed.signing_key is SigningKey.NONE:
        raise VerificationError(
            "signing_key: the report is unsigned (SIGNING_KEY = NONE)", check="signing_key"
        )
    vlek = parsed.signing_key is SigningKey.VLEK
    kind = "VLEK" if vlek else "VCEK"

    # 2. the signing certificate
    leaf_der = signer_cert
    if leaf_der is None and cert_table:
        leaf_der = CertTable.from_bytes(cert_table).get(VLEK_GUID if vlek else VCEK_GUID)
    if leaf_der is None and cache_dir is not None:
        leaf_der = find_cached_vcek(
            cache_dir, chip_id=parsed.chip_id, spl=parsed.reported_tcb.components(), vlek=vlek
        )
    if leaf_der is None:
        raise VerificationError(
            f"vcek_missing: no {kind} certificate in the evidence or the local cache",
            check="vcek_missing",
        )
    leaf = load_amd_certificate(bytes(leaf_der))
    found = roots.find(leaf)
    if found is None:
        raise VerificationError(
            f"trusted_root: the {kind}'s issuer {common_name(leaf.issuer)!r} is no ASK/ASVK "
            "of the trusted roots (simulated evidence needs its local root passed explicitly)",
            check="trusted_root",
        )
    root_set, inter = found
    inter_name = common_name(inter.subject)

    # 3-5. the chain (cached per process)
    require_signed_by(root_set.ark, root_set.ark, check="ark_self_signed", what="the ARK")
    checks.append(Check("ark_self_signed", True, common_name(root_set.ark.subject)))
    require_signed_by(inter, root_set.ark, check="ask_signature", what=inter_name)
    checks.append(
        Check("ask_signature", True, f"{inter_name} <- {common_name(root_set.ark.subject)}")
    )
    require_signed_by(leaf, inter, check="vcek_signature", what=f"the {kind}")
    checks.append(Check("vcek_signature", True, f"{kind} <- {inter_name}"))

    # 6. validity
    require_valid_at((root_set.ark, inter, leaf), now)
    checks.append(
        Check("validity_period", True, f"{kind} valid until {leaf.not_valid_after_utc.isoformat()}")
    )

    # 7. product line: genuine roots name it; the report's CPUID (v3+) must agree
    ext = amd_extensions(leaf)
    product = _chain_product(root_set.name if root_set.genuine_amd else None, ext.product_name)
    if product is not None and parsed.product is not None and product is not parsed.product:
        raise VerificationError(
            f"report_product: report CPUID says {parsed.product.value} but the chain is "
            f"{product.value}",
            check="report_product",
        )
    if product is not None and TcbLayout.for_product(product) is not parsed.reported_tcb.layout:
        parsed = SnpReport.from_bytes(report, product=product)
    checks.append(Check("report_product", True, str(product or parsed.product or "unknown")))

    # 8. TCB extensions == REPORTED_TCB
    want = parsed.reported_tcb.components()
    got = {name: ext.spl.get(name) for name in want}
    if got != want:
        raise VerificationError(
            f"vcek_tcb: {kind} TCB {got} does not equal REPORTED_TCB {want}", check="vcek_tcb"
        )
    checks.append(Check("vcek_tcb", True, ", ".join(f"{k}={v}" for k, v in want.items())))

    # 9. hwID == CHIP_ID (a VLEK is not chip-specific)
    if vlek:
        checks.append(Check("vcek_hwid", None, "VLEK: no hwID (not chip-specific)"))
    elif ext.hwid is None or not hwid_matches(ext.hwid, parsed.chip_id):
        raise VerificationError(
            "vcek_hwid: the VCEK's hwID does not equal the report's CHIP_ID "
            "(the VCEK belongs to another chip)",
            check="vcek_hwid",
        )
    else:
        checks.append(Check("vcek_hwid", True, f"hwID = CHIP_ID {parsed.chip_id[:8].hex()}…"))

    # 10. the report signature: ECDSA P-384 SHA-384, r and s little-endian
    _verify_report_signature(parsed, leaf, kind)
    checks.append(Check("report_signature", True, f"ECDSA P-384 SHA-384 by the {kind}"))

    platform = Platform.SEV_SNP if root_set.genuine_amd else Platform.SIMULATED_SNP
    checks.append(
        Check("platform", None, f"AMD SEV-SNP, genuine AMD root ({root_set.name})")
        if root_set.genuine_amd
        else Check("platform", None, f"SIMULATED SEV-SNP: not a real TEE (root {root_set.name})")
    )
    fields: dict[str, Any] = parsed.fields()
    fields.update(
        platform=platform.value,
        root=root_set.name,
        signer_subject=common_name(leaf.subject),
        signer_issuer=inter_name,
        signer_not_after=leaf.not_valid_after_utc.isoformat(),
    )
    if ext.product_name is not None:
        fields["signer_product_name"] = ext.product_name
    return Claims(
        platform=platform,
        report_data=parsed.report_data,
        debug=parsed.debug,
        measurements={"measurement": parsed.measurement},
        fields=fields,
        checks=tuple(checks),
    )


def verify_snp(
    report: bytes,
    *,
    roots: TrustedRoots,
    cert_table: bytes = b"",
    signer_cert: bytes | None = None,
    cache_dir: str | Path | None = None,
) -> Claims:
    """:func:`verify_snp_at_time` at the current time."""
    return verify_snp_at_time(
        report,
        roots=roots,
        now=datetime.now(UTC),
        cert_table=cert_table,
        signer_cert=signer_cert,
        cache_dir=cache_dir,
    )


def _chain_product(root_name: str | None, product_name: str | None) -> Product | None:
    if root_name is not None:
        return Product.from_name(root_name)
    return Product.from_name(product_name) if product_name else None


def _verify_report_signature(parsed: SnpReport, leaf: x509.Certificate, kind: str) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VerificationError(
            f"report_signature: the {kind} key is not an ECDSA P-384 key", check="report_signature"
        )
    r = int.from_bytes(parsed.signature_r, "little")
    s = int.from_bytes(parsed.signature_s, "little")
    try:
        key.verify(encode_dss_signature(r, s), parsed.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise VerificationError(
            f"report_signature: the report's signature does not verify with the {kind} "
            "(report altered or signed by another key)",
            check="report_signature",
        ) from exc
