"""The simulated SEV-SNP platform: root creation, reports, sealing keys."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform
from sealserve.attestation.snp import Product, SnpReport
from sealserve.attestation.snp_certs import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    CertTable,
    TrustedRoots,
    hwid_matches,
)
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.enclave.simulated import DEFAULT_MEASUREMENT, SimulatedPlatform
from sealserve.errors import ConfigError


def test_create_root_writes_the_chain_and_private_files(sim_root: Path) -> None:
    names = {p.name for p in sim_root.iterdir()}
    assert names == {
        "ark.pem",
        "ask.pem",
        "vcek.der",
        "vcek_key.pem",
        "sealing_secret",
        "platform.json",
    }
    for private in ("vcek_key.pem", "sealing_secret"):
        assert stat.S_IMODE((sim_root / private).stat().st_mode) == 0o600
    roots = TrustedRoots.from_dir(sim_root)
    assert not roots.sets[0].genuine_amd


def test_create_root_refuses_an_existing_platform(sim_root: Path) -> None:
    with pytest.raises(ConfigError, match="already holds a platform"):
        SimulatedPlatform.create_root(sim_root)


def test_missing_directory_names_create_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lacks ark\.pem") as err:
        SimulatedPlatform(tmp_path)
    assert "create_root" in err.value.remedy


def test_report_layout_and_verification(sim_root: Path) -> None:
    measurement = bytes(range(48))
    platform = SimulatedPlatform(sim_root, measurement=measurement, vmpl=1, guest_svn=3)
    produced = platform.report(b"\x07" * 64)
    assert produced.kind is Platform.SIMULATED_SNP
    assert len(produced.report) == 1184
    parsed = SnpReport.from_bytes(produced.report)
    assert (parsed.measurement, parsed.vmpl, parsed.guest_svn) == (measurement, 1, 3)
    assert parsed.report_data == b"\x07" * 64 and not parsed.debug
    table = CertTable.from_bytes(produced.certs)
    assert {g for g, _ in table.entries} == {VCEK_GUID, ASK_GUID, ARK_GUID}
    claims = verify_snp_at_time(
        produced.report,
        roots=TrustedRoots.from_dir(sim_root),
        now=datetime.now(UTC),
        cert_table=produced.certs,
    )
    assert claims.platform is Platform.SIMULATED_SNP
    assert claims.fields["signer_subject"] == "SEV-VCEK-SIMULATED"


def test_debug_flag_sets_policy_bit_19(sim_root: Path) -> None:
    parsed = SnpReport.from_bytes(SimulatedPlatform(sim_root, debug=True).report(bytes(64)).report)
    assert parsed.debug and "DEBUG" in parsed.policy.flags
    with pytest.raises(ValueError, match="64 bytes"):
        SimulatedPlatform(sim_root).report(b"short")
    with pytest.raises(ConfigError, match="48 bytes"):
        SimulatedPlatform(sim_root, measurement=b"x")


def test_sealing_key_is_bound_to_measurement_and_label(sim_root: Path) -> None:
    a = SimulatedPlatform(sim_root)
    again = SimulatedPlatform(sim_root, measurement=DEFAULT_MEASUREMENT)
    other = SimulatedPlatform(sim_root, measurement=bytes(48))
    key = a.sealing_key(b"ledger")
    assert len(key) == 32
    assert again.sealing_key(b"ledger") == key
    assert other.sealing_key(b"ledger") != key
    assert a.sealing_key(b"audit") != key


@pytest.mark.parametrize("version", [2, 3, 5])
def test_turin_layout_end_to_end(tmp_path_factory: pytest.TempPathFactory, version: int) -> None:
    root = tmp_path_factory.getbasetemp() / "simulated-turin"
    if not (root / "platform.json").exists():
        SimulatedPlatform.create_root(
            root, product=Product.TURIN, tcb={"fmc": 2, "bl": 3, "tee": 4, "snp": 5, "ucode": 6}
        )
    platform = SimulatedPlatform(root, report_version=version)
    produced = platform.report(b"\x01" * 64)
    claims = verify_snp_at_time(
        produced.report,
        roots=TrustedRoots.from_dir(root),
        now=datetime.now(UTC),
        cert_table=produced.certs,
    )
    # Version 2 carries no CPUID: the verifier takes Turin from the VCEK's productName.
    assert claims.fields["product"] == "Turin"
    assert claims.fields["tcb_layout"] == "turin"
    assert claims.fields["reported_tcb"] == {
        "fmc": 2,
        "bl": 3,
        "tee": 4,
        "snp": 5,
        "ucode": 6,
        "raw": "0203040500000006",
    }
    assert ("cpuid_fam_mod_step" in claims.fields) is (version >= 3)
    assert ("launch_mit_vector" in claims.fields) is (version >= 5)


def test_hwid_matching_rules() -> None:
    chip = bytes(range(64))
    assert hwid_matches(chip, chip)
    assert hwid_matches(chip[:8], chip)  # Turin VCEKs carry the first 8 bytes
    assert not hwid_matches(bytes(64), chip)
    assert not hwid_matches(chip[:16], chip)
