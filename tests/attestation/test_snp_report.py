"""Parsing SEV-SNP reports: genuine vectors, every layout variant, and bad input."""

from __future__ import annotations

import struct

import pytest

from sealserve.attestation.snp import (
    REPORT_SIZE,
    FirmwareVersion,
    Product,
    SigningKey,
    SnpReport,
    TcbLayout,
    TcbVersion,
    build_report,
)
from sealserve.errors import EvidenceFormatError
from tests.attestation.conftest import EXPECTED, read_vector

SIGNER_KEYS = {"signer_subject", "signer_issuer", "signer_not_after"}


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_genuine_report_decodes_to_expected_fields(rel: str) -> None:
    fields = SnpReport.from_bytes(read_vector(rel)).fields()
    expected = {k: v for k, v in EXPECTED[rel].items() if k not in SIGNER_KEYS}
    assert {k: fields.get(k) for k in expected} == expected


def test_report_is_typed_and_immutable() -> None:
    report = SnpReport.from_bytes(read_vector("sev-snp/trustee/test-vlek-report.bin"))
    assert report.version == 3
    assert report.vmpl == 1
    assert report.signing_key is SigningKey.VLEK
    assert report.product is Product.MILAN  # from CPUID 19/01/01
    assert report.reported_tcb.components() == {"bl": 4, "tee": 0, "snp": 24, "ucode": 217}
    assert report.current == FirmwareVersion(1, 55, 29)
    assert not report.policy.debug and report.policy.smt and not report.policy.migrate_ma
    with pytest.raises(AttributeError):
        report.vmpl = 0  # type: ignore[misc]


def test_debug_report_policy_bits() -> None:
    report = SnpReport.from_bytes(read_vector("sev-snp/go-sev-guest/attestation.bin"))
    assert report.debug
    assert report.policy.flags == ("SMT", "RESERVED_1", "DEBUG")
    assert report.cpuid_fam_id is None  # version 2 carries no CPUID


@pytest.mark.parametrize("size", [0, 1, REPORT_SIZE - 1, REPORT_SIZE + 1, 4096])
def test_wrong_size_is_refused(size: int) -> None:
    with pytest.raises(EvidenceFormatError, match="report_size") as err:
        SnpReport.from_bytes(bytes(size))
    assert err.value.check == "report_size"


def _with(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_version_is_refused(version: int) -> None:
    data = _with(read_vector("sev-snp/trustee/test-report.bin"), 0, "<I", version)
    with pytest.raises(EvidenceFormatError, match=f"unknown SEV-SNP report version {version}"):
        SnpReport.from_bytes(data)


@pytest.mark.parametrize("algo", [0, 2, 0x100])
def test_unknown_signature_algorithm_is_refused(algo: int) -> None:
    data = _with(read_vector("sev-snp/trustee/test-report.bin"), 0x34, "<I", algo)
    with pytest.raises(EvidenceFormatError, match="unknown signature algorithm") as err:
        SnpReport.from_bytes(data)
    assert err.value.check == "signature_algo"


def test_reserved_signing_key_is_refused() -> None:
    data = _with(read_vector("sev-snp/trustee/test-report.bin"), 0x48, "<I", 3 << 2)
    with pytest.raises(EvidenceFormatError, match="SIGNING_KEY value 3"):
        SnpReport.from_bytes(data)


def test_turin_layout_from_cpuid() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.TURIN, fmc=1, bl=2, tee=3, snp=4, ucode=5)
    assert tcb.raw == bytes([1, 2, 3, 4, 0, 0, 0, 5])
    raw = build_report(version=3, current_tcb=tcb, cpuid=(0x1A, 0x02, 0x01))
    report = SnpReport.from_bytes(raw)
    assert report.product is Product.TURIN
    assert report.reported_tcb.components() == {"bl": 2, "tee": 3, "snp": 4, "ucode": 5, "fmc": 1}
    assert report.fields()["reported_tcb"] == {
        "fmc": 1,
        "bl": 2,
        "tee": 3,
        "snp": 4,
        "ucode": 5,
        "raw": "0102030400000005",
    }


def test_genoa_cpuid_uses_the_milan_genoa_layout() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.MILAN_GENOA, bl=9, tee=1, snp=22, ucode=84)
    report = SnpReport.from_bytes(build_report(current_tcb=tcb, cpuid=(0x19, 0x11, 0x01)))
    assert report.product is Product.GENOA
    assert report.reported_tcb.components() == {"bl": 9, "tee": 1, "snp": 22, "ucode": 84}


def test_product_conflicting_with_cpuid_is_refused() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.MILAN_GENOA, bl=1, tee=0, snp=1, ucode=1)
    raw = build_report(current_tcb=tcb, cpuid=(0x19, 0x01, 0x01))
    with pytest.raises(EvidenceFormatError, match="CPUID says Milan, not Turin"):
        SnpReport.from_bytes(raw, product=Product.TURIN)


def test_version2_turin_needs_the_product_given() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.TURIN, fmc=7, bl=2, tee=3, snp=4, ucode=5)
    raw = build_report(version=2, current_tcb=tcb)
    assert SnpReport.from_bytes(raw).reported_tcb.layout is TcbLayout.MILAN_GENOA
    turin = SnpReport.from_bytes(raw, product=Product.TURIN)
    assert turin.reported_tcb.fmc == 7 and turin.cpuid_fam_id is None


def test_version5_mitigation_vectors() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.MILAN_GENOA, bl=1, tee=0, snp=1, ucode=1)
    buf = bytearray(build_report(version=5, current_tcb=tcb))
    struct.pack_into("<QQ", buf, 0x1F8, 0x5, 0x7)
    report = SnpReport.from_bytes(bytes(buf))
    assert (report.launch_mit_vector, report.current_mit_vector) == (5, 7)
    assert report.fields()["launch_mit_vector"] == "0x5"
    v3 = SnpReport.from_bytes(build_report(version=3, current_tcb=tcb))
    assert v3.launch_mit_vector is None and "launch_mit_vector" not in v3.fields()


def test_build_report_round_trips_every_field() -> None:
    tcb = TcbVersion.build(layout=TcbLayout.MILAN_GENOA, bl=3, tee=0, snp=8, ucode=115)
    raw = build_report(
        version=3,
        guest_svn=7,
        policy=0x30000 | 1 << 18,
        vmpl=2,
        current_tcb=tcb,
        report_data=b"\x01" * 64,
        measurement=b"\x02" * 48,
        host_data=b"\x03" * 32,
        chip_id=b"\x04" * 64,
        signing_key=SigningKey.VLEK,
    )
    report = SnpReport.from_bytes(raw)
    assert (report.guest_svn, report.vmpl, report.policy.migrate_ma) == (7, 2, True)
    assert report.measurement == b"\x02" * 48 and report.host_data == b"\x03" * 32
    assert report.signing_key is SigningKey.VLEK
    assert report.fields()["cpuid_fam_mod_step"] == "19/01/01"
    with pytest.raises(ValueError, match="measurement must be 48 bytes"):
        build_report(current_tcb=tcb, measurement=b"short")
