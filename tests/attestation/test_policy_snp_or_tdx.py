"""One client policy file that accepts "SNP or TDX, with these measurements"."""

from __future__ import annotations

import pytest

from sealserve.attestation.policy import DEFAULT_POLICY, policy_from_toml
from sealserve.attestation.snp_certs import VCEK_GUID, CertTable, TrustedRoots
from sealserve.attestation.snp_verify import verify_snp_at_time
from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.errors import ConfigError, PolicyError
from tests.attestation._tdx_util import EXPECTED as TDX_EXPECTED
from tests.attestation._tdx_util import NOW as TDX_NOW
from tests.attestation._tdx_util import raw
from tests.attestation.conftest import NOW as SNP_NOW
from tests.attestation.conftest import SIGNERS, read_vector

SNP_REL = "sev-snp/trustee/test-report.bin"
TDX_REL = "tdx/go-tdx-guest/quote_v5_sample.dat"
SNP_MEASUREMENT = "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c"


def _snp_claims():  # type: ignore[no-untyped-def]
    return verify_snp_at_time(
        read_vector(SNP_REL), roots=TrustedRoots.amd(), now=SNP_NOW,
        cert_table=CertTable.build({VCEK_GUID: SIGNERS[SNP_REL]}).to_bytes(),
    )  # fmt: skip


def _tdx_claims(name: str = TDX_REL):  # type: ignore[no-untyped-def]
    return verify_tdx_at_time(raw(name), now=TDX_NOW)


def _policy(snp_measurement: str, mrtd: str) -> str:
    return f"""
version = 1

[[any_of]]
platforms = ["sev-snp"]
[any_of.sev-snp]
measurement = ["{snp_measurement}"]
min_tcb = {{ bl = 3, snp = 8 }}

[[any_of]]
platforms = ["tdx"]
[any_of.tdx]
mrtd = ["{mrtd}"]
xfam = "{TDX_EXPECTED[TDX_REL]["xfam"]}"
"""


def test_any_of_accepts_either_platform_with_its_measurement() -> None:
    mrtd = TDX_EXPECTED[TDX_REL]["mrtd"]
    policy = policy_from_toml(_policy(SNP_MEASUREMENT, mrtd))
    policy.verify(_snp_claims())
    policy.verify(_tdx_claims())


def test_any_of_rejects_wrong_measurements() -> None:
    policy = policy_from_toml(_policy("00" * 48, "11" * 48))
    with pytest.raises(PolicyError):
        policy.verify(_snp_claims())
    with pytest.raises(PolicyError):
        policy.verify(_tdx_claims())


def test_default_policy_rejects_debug_td_naming_debug() -> None:
    claims = _tdx_claims("tdx/trustee/tdx_quote_4.dat")
    assert claims.debug
    with pytest.raises(PolicyError, match="DEBUG"):
        DEFAULT_POLICY.verify(claims)
    DEFAULT_POLICY.verify(_tdx_claims())  # a non-debug TD passes the default policy


def test_tdx_section_validates_keys() -> None:
    with pytest.raises(ConfigError, match="tdx.bogus"):
        policy_from_toml("version = 1\n[tdx]\nbogus = 1\n")
    with pytest.raises(ConfigError):
        policy_from_toml('version = 1\n[tdx]\nmrtd = ["abcd"]\n')
    with pytest.raises(PolicyError, match="TCB status"):
        policy_from_toml('version = 1\n[tdx]\ntcb_status = ["UpToDate"]\n').verify(_tdx_claims())


def test_snp_section_does_not_pass_tdx_claims() -> None:
    # The attack of issue 15: a policy that pins an SNP measurement and omits
    # `platforms` used to release to any genuine TD (the SNP rules were skipped).
    policy = policy_from_toml(f'version = 1\n[sev-snp]\nmeasurement = ["{SNP_MEASUREMENT}"]\n')
    policy.verify(_snp_claims())
    with pytest.raises(PolicyError, match="platform tdx: the policy has no section for it"):
        policy.verify(_tdx_claims())


def test_tdx_section_does_not_pass_snp_claims() -> None:
    mrtd = TDX_EXPECTED[TDX_REL]["mrtd"]
    policy = policy_from_toml(f'version = 1\n[tdx]\nmrtd = ["{mrtd}"]\n')
    policy.verify(_tdx_claims())
    with pytest.raises(PolicyError, match="platform sev-snp: the policy has no section"):
        policy.verify(_snp_claims())


def test_each_platform_is_judged_by_its_own_section() -> None:
    mrtd = TDX_EXPECTED[TDX_REL]["mrtd"]
    both = (
        f'version = 1\n[sev-snp]\nmeasurement = ["{SNP_MEASUREMENT}"]\n[tdx]\nmrtd = ["{mrtd}"]\n'
    )
    policy = policy_from_toml(both)
    policy.verify(_snp_claims())
    policy.verify(_tdx_claims())
    with pytest.raises(PolicyError, match="mrtd"):
        policy_from_toml(both.replace(mrtd, "00" * 48)).verify(_tdx_claims())
    # An explicitly empty section admits its platform with the top-level rules only.
    empty = policy_from_toml(
        f'version = 1\n[sev-snp]\nmeasurement = ["{SNP_MEASUREMENT}"]\n[tdx]\n'
    )
    empty.verify(_tdx_claims())
