"""Composable policies and the TOML policy file."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from sealserve.attestation.claims import Claims, Platform
from sealserve.attestation.policy import (
    DEFAULT_POLICY,
    AllOf,
    AnyOf,
    DebugDisallowed,
    ManifestDigestIn,
    MeasurementIn,
    MigrationAgentDisallowed,
    MinimumGuestSvn,
    MinimumTcb,
    OnPlatforms,
    PlatformIn,
    ReportDataEquals,
    UnsafeAllowSimulated,
    UnsafePolicyWarning,
    Vmpl,
    load_policy,
    policy_from_toml,
)
from sealserve.errors import ConfigError, PolicyError
from tests.conftest import ROOT

MEAS = bytes(range(48))


def claims(
    *,
    platform: Platform = Platform.SEV_SNP,
    debug: bool = False,
    measurement: bytes = MEAS,
    manifest_digest: bytes | None = b"\x11" * 32,
    **fields: Any,
) -> Claims:
    base: dict[str, Any] = {
        "policy_migrate_ma": False,
        "reported_tcb": {"bl": 3, "tee": 0, "snp": 8, "ucode": 115, "raw": "00"},
        "guest_svn": 2,
        "vmpl": 0,
    }
    base.update(fields)
    return Claims(
        platform=platform,
        report_data=b"\x05" * 64,
        debug=debug,
        measurements={"measurement": measurement},
        fields=base,
        manifest_digest=manifest_digest,
    )


def denies(policy: Any, c: Claims, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        policy.verify(c)


def test_default_policy() -> None:
    DEFAULT_POLICY.verify(claims())
    denies(DEFAULT_POLICY, claims(debug=True), "DEBUG policy bit is set: debug guests")
    denies(DEFAULT_POLICY, claims(platform=Platform.SIMULATED_SNP), "simulated-sev-snp is not")
    denies(DEFAULT_POLICY, claims(policy_migrate_ma=True), "MIGRATE_MA policy bit is set")
    denies(DEFAULT_POLICY, claims(platform=Platform.TDX, debug=True), "DEBUG attribute is set")


def test_all_of_any_of_and_empty_lists() -> None:
    denies(AllOf([]), claims(), "AllOf: the policy list is empty")
    denies(AnyOf([]), claims(), "AnyOf: the policy list is empty")
    AnyOf([DebugDisallowed(), MinimumGuestSvn(99)]).verify(claims())
    denies(
        AnyOf([MinimumGuestSvn(99), Vmpl(frozenset({3}))]),
        claims(),
        r"no alternative passed: \[1\] guest_svn 2 is below the minimum 99; \[2\] VMPL 0",
    )


def test_measurement_in_is_generic_over_registers() -> None:
    MeasurementIn("measurement", [MEAS.hex()]).verify(claims())
    denies(MeasurementIn("measurement", [bytes(48)]), claims(), "is not in the allowed list")
    denies(MeasurementIn("mrtd", [MEAS]), claims(), "mrtd: the claims carry no such")
    denies(MeasurementIn("measurement", []), claims(), "allowed list is empty")
    with pytest.raises(ConfigError, match="is not hex"):
        MeasurementIn("measurement", ["zz"])


def test_minimum_tcb() -> None:
    MinimumTcb(bl=3, snp=8, ucode=115).verify(claims())
    denies(MinimumTcb(ucode=116), claims(), "TCB component ucode = 115 is below the minimum 116")
    denies(MinimumTcb(fmc=1), claims(), "TCB component fmc is missing")


def test_small_rules() -> None:
    MinimumGuestSvn(2).verify(claims())
    denies(MinimumGuestSvn(3), claims(), "guest_svn 2 is below the minimum 3")
    Vmpl(frozenset({0, 1})).verify(claims())
    denies(Vmpl(frozenset({1})), claims(), r"VMPL 0 is not allowed \(allowed: \[1\]\)")
    ReportDataEquals(b"\x05" * 64).verify(claims())
    denies(ReportDataEquals(bytes(64)), claims(), "report_data does not equal")
    ManifestDigestIn([b"\x11" * 32]).verify(claims())
    denies(ManifestDigestIn([bytes(32)]), claims(), "is not in the allowed list")
    denies(ManifestDigestIn([bytes(32)]), claims(manifest_digest=None), "carried no workload")
    denies(
        MigrationAgentDisallowed(),
        claims(platform=Platform.TDX, policy_migrate_ma=None),
        "MIGRATE_MA",
    )
    OnPlatforms(frozenset({Platform.TDX}), MinimumGuestSvn(99)).verify(claims())


def test_platform_in_refuses_simulated() -> None:
    with pytest.raises(ConfigError, match="use UnsafeAllowSimulated"):
        PlatformIn(frozenset({Platform.SIMULATED_SNP}))


def test_unsafe_allow_simulated_warns_every_time() -> None:
    policy = UnsafeAllowSimulated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.verify(claims(platform=Platform.SIMULATED_SNP))
        policy.verify(claims(platform=Platform.SIMULATED_SNP))
        with pytest.raises(PolicyError, match="sev-snp is not simulated"):
            policy.verify(claims())
    assert [w.category for w in caught] == [UnsafePolicyWarning] * 3


# --- TOML ------------------------------------------------------------------------------


def test_empty_file_is_the_default_policy() -> None:
    policy = policy_from_toml("")
    policy.verify(claims())
    denies(policy, claims(debug=True), "DEBUG policy bit is set")
    denies(policy, claims(platform=Platform.SIMULATED_SNP), "not a real TEE")
    denies(policy, claims(policy_migrate_ma=True), "MIGRATE_MA")


def test_full_snp_section() -> None:
    policy = policy_from_toml(
        f"""
        version = 1
        platforms = ["sev-snp"]
        manifest_digests = ["{"11" * 32}"]
        [sev-snp]
        measurement = ["{MEAS.hex()}"]
        min_tcb = {{ bl = 3, snp = 8, ucode = 115 }}
        min_guest_svn = 2
        vmpl = [0]
        """
    )
    policy.verify(claims())
    denies(policy, claims(measurement=bytes(48)), "measurement .* is not in the allowed list")
    denies(policy, claims(guest_svn=1), "guest_svn 1 is below")
    denies(policy, claims(vmpl=1), "VMPL 1 is not allowed")
    denies(policy, claims(manifest_digest=bytes(32)), "manifest digest")
    denies(policy, claims(platform=Platform.TDX), "platform tdx is not allowed")


def test_any_of_blocks() -> None:
    policy = policy_from_toml(
        f"""
        [[any_of]]
        manifest_digests = ["{"11" * 32}"]
        [[any_of]]
        manifest_digests = ["{"22" * 32}"]
        [any_of.sev-snp]
        min_guest_svn = 5
        """
    )
    policy.verify(claims())
    policy.verify(claims(manifest_digest=b"\x22" * 32, guest_svn=5))
    denies(policy, claims(manifest_digest=b"\x22" * 32), r"\[2\] guest_svn 2 is below")


def test_unsafe_allow_simulated_in_toml() -> None:
    policy = policy_from_toml("unsafe_allow_simulated = true\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.verify(claims(platform=Platform.SIMULATED_SNP))
        # Naming the simulated platform does not open the real ones (issue trust-root:
        # such a key policy released to any genuine TD); they must be named.
        denies(policy, claims(), "sev-snp is not simulated")
        denies(policy, claims(platform=Platform.SIMULATED_SNP, debug=True), "DEBUG")
        both = policy_from_toml('platforms = ["sev-snp"]\nunsafe_allow_simulated = true\n')
        both.verify(claims())
        both.verify(claims(platform=Platform.SIMULATED_SNP))
    assert any(w.category is UnsafePolicyWarning for w in caught)


def test_measurements_table_generic() -> None:
    policy = policy_from_toml(f'[measurements]\nmeasurement = ["{MEAS.hex()}"]\n')
    policy.verify(claims())
    denies(policy, claims(measurement=bytes(48)), "not in the allowed list")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("debug = true", "unknown key 'debug'"),
        ("[sev-snp]\nmeasurment = []", "unknown key sev-snp.measurment"),
        ("[sev-snp]\nmin_tcb = { blx = 1 }", "unknown TCB component 'blx'"),
        ("[sev-snp]\nmin_tcb = { bl = true }", "sev-snp.min_tcb.bl: expected an integer"),
        ('[sev-snp]\nmeasurement = ["00"]', r"sev-snp.measurement\[0\]: expected 48 bytes"),
        ("[sev-snp]\nmeasurement = []", "the list is empty"),
        ('[sev-snp]\nmeasurement = ["zz"]', "is not hex"),
        ("[sev-snp]\nvmpl = 0", "sev-snp.vmpl: expected list"),
        ('platforms = ["sgx"]', "unknown platform"),
        ('platforms = ["simulated-sev-snp"]', "use UnsafeAllowSimulated"),
        ('allow_debug = "no"', "allow_debug: expected bool"),
        ("version = 2", "unsupported version 2"),
        ("[[any_of]]\n", r"any_of\[0\] has no rules"),
        ("[[any_of]]\nfoo = 1", r"unknown key 'any_of\[0\].foo'"),
        ("[[any_of]]\n[[any_of.any_of]]\nallow_debug = true", r"unknown key 'any_of\[0\].any_of'"),
        ("[[any_of]]\nversion = 1", r"unknown key 'any_of\[0\].version'"),
        ("this is not toml", "not valid TOML"),
        ('report_data = "00"', "expected 64 bytes"),
        ('manifest_digests = "00"', "manifest_digests: expected list"),
    ],
)
def test_bad_policy_files(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        policy_from_toml(text)


def test_load_policy_from_file(tmp_path: Path) -> None:
    good = tmp_path / "p.toml"
    good.write_text('platforms = ["sev-snp"]\n')
    load_policy(good).verify(claims())
    bad = tmp_path / "bad.toml"
    bad.write_text("nope = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: policy: unknown key 'nope'"):
        load_policy(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")


def test_documented_examples_load() -> None:
    doc = (ROOT / "docs" / "attestation-policy.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        policy_from_toml(block)
