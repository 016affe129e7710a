"""The Evidence wire object and the one function relying parties call to verify it.

Wire format (version 2), all lengths big-endian::

    b"SSEV" ‖ 0x02 ‖ TLV*        TLV = tag (1 byte) ‖ length (4 bytes) ‖ value

Each tag appears exactly once, in ascending order; unknown tags are refused:

==== =================  =================================================
tag  field              value
==== =================  =================================================
1    platform           UTF-8 ``Platform`` value ("sev-snp", ...)
2    report             the raw hardware report (SNP: 1184 bytes), quote (TDX) or
                        HCL report (azure-vtpm)
3    certs              SNP: cert table (kernel auxblob format) or chain; TDX: the
                        quote's collateral in dcap-qvl JSON form; may be empty;
                        azure-vtpm: the vTPM quote bundle (``azure_vtpm.VtpmBundle``)
4    manifest           the workload manifest (canonical JSON bytes)
5    tls_spki           the server's TLS SubjectPublicKeyInfo, DER
6    hpke_public_key    the enclave's HPKE public key (raw bytes)
7    nonce              the verifier's nonce this evidence answers
8    runtime_keys       the runtime keys record (canonical JSON,
                        ``sealserve.attestation.runtime_keys``)
==== =================  =================================================

Version 2 added tag 8 (and REPORT_DATA binding v2); version 1 is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sealserve.attestation.binding import check_nonce, verify_report_data_binding
from sealserve.attestation.claims import Check, Claims, Platform, Policy
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS, RuntimeKeys
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.attestation.tdx_collateral import TdxCollateral
from sealserve.errors import EvidenceFormatError, VerificationError

MAGIC = b"SSEV"
WIRE_VERSION = 2
MAX_FIELD = 1 << 20
_TAGS = (
    "platform", "report", "certs", "manifest", "tls_spki", "hpke_public_key", "nonce",
    "runtime_keys",
)  # fmt: skip
_TLV = struct.Struct(">BI")


@dataclass(frozen=True)
class Evidence:
    """What an attested server hands a verifier. Build with :meth:`from_bytes` or
    the constructor; both check the invariants."""

    platform: Platform
    report: bytes
    certs: bytes
    manifest: bytes
    tls_spki: bytes
    hpke_public_key: bytes
    nonce: bytes
    # The public keys the server made at first start (bound like the manifest).
    runtime_keys: bytes = NO_RUNTIME_KEYS

    def __post_init__(self) -> None:
        if not isinstance(self.platform, Platform):
            raise EvidenceFormatError("evidence: platform must be a Platform", check="evidence")
        for name in _TAGS[1:]:
            value = getattr(self, name)
            if not isinstance(value, bytes | bytearray | memoryview):
                raise EvidenceFormatError(f"evidence: {name} must be bytes", check="evidence")
            object.__setattr__(self, name, bytes(value))
            if len(value) > MAX_FIELD:
                raise EvidenceFormatError(
                    f"evidence: {name} is {len(value)} bytes (limit {MAX_FIELD})", check="evidence"
                )

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        """Decode. Raises EvidenceFormatError(check="evidence") on a wrong magic or
        version, a truncated or oversized field, a missing, repeated or unknown tag."""
        data = bytes(data)
        if len(data) < 5 or data[:4] != MAGIC:
            raise _bad("not sealserve evidence (wrong magic)")
        if data[4] != WIRE_VERSION:
            raise _bad(f"unsupported evidence format version {data[4]}")
        values: list[bytes] = []
        pos = 5
        while pos < len(data):
            if pos + _TLV.size > len(data):
                raise _bad("truncated field header")
            tag, length = _TLV.unpack_from(data, pos)
            pos += _TLV.size
            if tag != len(values) + 1:
                raise _bad(f"unexpected tag {tag} (want {len(values) + 1}, each once, in order)")
            if length > MAX_FIELD or pos + length > len(data):
                raise _bad(f"field {_TAGS[tag - 1]} is truncated or too long")
            values.append(data[pos : pos + length])
            pos += length
            if len(values) == len(_TAGS) and pos != len(data):
                raise _bad("trailing bytes after the last field")
        if len(values) != len(_TAGS):
            raise _bad(f"missing field {_TAGS[len(values)]}")
        try:
            platform = Platform(values[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _bad(f"unknown platform {values[0][:40]!r}") from exc
        return cls(platform, *values[1:])

    def to_bytes(self) -> bytes:
        out = bytearray(MAGIC + bytes([WIRE_VERSION]))
        for tag, name in enumerate(_TAGS, start=1):
            value = self.platform.value.encode() if name == "platform" else getattr(self, name)
            out += _TLV.pack(tag, len(value)) + value
        return bytes(out)

    @property
    def manifest_digest(self) -> bytes:
        return hashlib.sha256(self.manifest).digest()


def _bad(why: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"evidence: {why}", check="evidence")


def verify_report_at_time(
    platform: Platform,
    report: bytes,
    *,
    roots: TrustedRoots,
    now: datetime,
    certs: bytes = b"",
    cache_dir: str | Path | None = None,
    tdx_collateral: TdxCollateral | None = None,
) -> Claims:
    """Verify one raw hardware report of ``platform`` (no binding, no policy).

    SEV-SNP (genuine or simulated, ``roots`` decides): the report with its VCEK/VLEK
    from ``certs`` (cert table or PEM chain) or the cache. azure-vtpm: the HCL report
    with the quote, PCRs and VCEK chain in ``certs`` (``azure_vtpm``). TDX: the quote, only if
    ``roots`` trusts the pinned Intel SGX Root CA, with ``tdx_collateral``, else the
    collateral in ``certs`` (dcap-qvl JSON) when there is any.

    Raises EvidenceFormatError or VerificationError (``check`` names the step;
    ``roots`` when the platform's vendor root is not trusted).
    """
    if platform in (Platform.SEV_SNP, Platform.SIMULATED_SNP):
        return verify_snp_at_time(
            report, roots=roots, now=now, cert_table=certs, cache_dir=cache_dir
        )
    if platform is Platform.AZURE_VTPM:
        from sealserve.attestation.azure_vtpm import verify_azure_vtpm_at_time

        return verify_azure_vtpm_at_time(report, certs, roots=roots, now=now, cache_dir=cache_dir)
    if platform is Platform.TDX:
        if not roots.intel:
            raise VerificationError(
                "roots: TDX quotes chain to the Intel SGX Root CA, which is not among the "
                "trusted roots",
                check="roots",
            )
        from sealserve.attestation.tdx import verify_tdx_at_time
        from sealserve.attestation.tdx_quote import TdxQuote

        TdxQuote.from_bytes(report)  # a format error is named before the collateral's
        if tdx_collateral is None and certs:
            # Guest-supplied collateral is safe to take: every part is signed by Intel.
            tdx_collateral = TdxCollateral.from_dcap_json_cached(certs)
        # The PCK chain travels inside the quote; collateral decides the TCB status.
        return verify_tdx_at_time(report, now=now, collateral=tdx_collateral)
    raise VerificationError(
        f"platform: no verifier for {platform.value} evidence", check="platform"
    )


def verify_evidence_at_time(
    evidence: Evidence,
    *,
    policy: Policy,
    roots: TrustedRoots,
    expected_nonce: bytes,
    now: datetime,
    cache_dir: str | Path | None = None,
    tdx_collateral: TdxCollateral | None = None,
) -> Claims:
    """Verify evidence end to end as of ``now`` and return the claims.

    1 the nonce is the one we sent (replay); 2 the platform report and its chain
    (``roots`` decides genuine vs. simulated); 3 REPORT_DATA binds the nonce, TLS key,
    manifest, HPKE key and runtime keys record; 4 the manifest digest and the runtime
    keys are recorded; 5 ``policy`` decides.

    Raises EvidenceFormatError, VerificationError (``check`` names the step) or
    PolicyError.
    """
    checks: list[Check] = []
    # 1. freshness
    check_nonce(expected_nonce)
    if not hmac.compare_digest(evidence.nonce, expected_nonce):
        raise VerificationError(
            "nonce: the evidence answers another nonce (replayed or stale evidence)",
            check="nonce",
        )
    checks.append(Check("nonce", True, "evidence answers our nonce"))
    # 2. platform report and chain
    claims = verify_report_at_time(
        evidence.platform,
        evidence.report,
        roots=roots,
        now=now,
        certs=evidence.certs,
        cache_dir=cache_dir,
        tdx_collateral=tdx_collateral,
    )
    if claims.platform is not evidence.platform:
        raise VerificationError(
            f"platform: evidence is labelled {evidence.platform.value} but its chain makes "
            f"it {claims.platform.value}",
            check="platform",
        )
    # 3. binding
    verify_report_data_binding(
        claims.report_data,
        nonce=evidence.nonce,
        tls_spki=evidence.tls_spki,
        manifest=evidence.manifest,
        hpke_public_key=evidence.hpke_public_key,
        runtime_keys=evidence.runtime_keys,
    )
    checks.append(
        Check("report_data_binding", True, "nonce, TLS key, manifest, HPKE key, runtime keys")
    )
    # 4. manifest and runtime keys (parsed only once the report binds them)
    digest = evidence.manifest_digest
    checks.append(Check("manifest_digest", None, digest.hex()))
    runtime_keys = RuntimeKeys.from_bytes(evidence.runtime_keys)
    audit_key = runtime_keys.audit_fingerprint
    checks.append(Check("runtime_keys", None, f"audit key {audit_key or 'none'}"))
    fields = {**claims.fields, "manifest_digest": digest.hex()}
    if audit_key is not None:
        fields["audit_key"] = audit_key
    claims = dataclasses.replace(
        claims,
        manifest_digest=digest,
        runtime_keys=runtime_keys,
        checks=claims.checks + tuple(checks),
        fields=fields,
    )
    # 5. policy
    policy.verify(claims)
    return dataclasses.replace(
        claims, checks=(*claims.checks, Check("policy", True, type(policy).__name__))
    )


def verify_evidence(
    evidence: Evidence,
    *,
    policy: Policy,
    roots: TrustedRoots,
    expected_nonce: bytes,
    cache_dir: str | Path | None = None,
    tdx_collateral: TdxCollateral | None = None,
) -> Claims:
    """:func:`verify_evidence_at_time` at the current time."""
    return verify_evidence_at_time(
        evidence,
        policy=policy,
        roots=roots,
        expected_nonce=expected_nonce,
        tdx_collateral=tdx_collateral,
        now=datetime.now(UTC),
        cache_dir=cache_dir,
    )
