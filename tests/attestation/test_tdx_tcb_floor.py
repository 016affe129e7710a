"""A TDX TCB floor in the default client policy and in every starter policy: a quote
reporting TEE_TCB_SVN of all zeros is refused by default; every genuine vector passes."""

from __future__ import annotations

import dataclasses

import pytest

from sealserve.attestation.claims import Claims
from sealserve.attestation.launch import STARTER_MIN_TEE_TCB_SVN, reference_policy
from sealserve.attestation.policy import DEFAULT_POLICY, policy_from_toml
from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_policy import MinimumTeeTcbSvn
from sealserve.errors import ConfigError, PolicyError
from tests.attestation._tdx_util import EXPECTED, NOW, raw

GENUINE = sorted(EXPECTED)


def _with_svn(claims: Claims, svn: str) -> Claims:
    return dataclasses.replace(claims, fields={**claims.fields, "tee_tcb_svn": svn})


@pytest.mark.parametrize("name", GENUINE)
def test_every_genuine_quote_passes_the_default_floor(name: str) -> None:
    claims = verify_tdx_at_time(raw(name), now=NOW)
    if claims.debug:  # refused, but for being a debug TD, not for its TCB
        with pytest.raises(PolicyError, match="DEBUG attribute"):
            DEFAULT_POLICY.verify(claims)
        claims = dataclasses.replace(claims, debug=False)
    DEFAULT_POLICY.verify(claims)


def test_the_default_policy_refuses_an_all_zero_tee_tcb_svn() -> None:
    claims = verify_tdx_at_time(raw("tdx/go-tdx-guest/quote_v5_sample.dat"), now=NOW)
    with pytest.raises(PolicyError, match=r"TEE_TCB_SVN 0{32} is below the floor 030002") as e:
        DEFAULT_POLICY.verify(_with_svn(claims, "00" * 16))
    assert e.value.check == "tdx.min_tee_tcb_svn"
    with pytest.raises(PolicyError, match=r"byte 2: 1 < 2"):
        DEFAULT_POLICY.verify(_with_svn(claims, "0b0101" + "00" * 13))


def test_starter_policies_carry_the_floor() -> None:
    regs = {r: bytes([i + 1]) * 48 for i, r in enumerate(("mrtd", "rtmr0", "rtmr1", "rtmr2"))}
    claims = verify_tdx_at_time(raw("tdx/go-tdx-guest/quote_v5_sample.dat"), now=NOW)
    claims = dataclasses.replace(claims, measurements=regs)
    policy = policy_from_toml(reference_policy(platform="tdx", registers=regs))
    policy.verify(claims)
    with pytest.raises(PolicyError, match="below the floor"):
        policy.verify(_with_svn(claims, "00" * 16))
    raised = policy_from_toml(
        reference_policy(platform="tdx", registers=regs, min_tee_tcb_svn=bytes([12] + [0] * 15))
    )
    with pytest.raises(PolicyError, match=r"byte 0: 11 < 12"):
        raised.verify(claims)


def test_the_floor_rule_refuses_nonsense() -> None:
    assert len(bytes.fromhex(STARTER_MIN_TEE_TCB_SVN)) == 16
    with pytest.raises(ConfigError, match="all zeros would pass every TCB"):
        MinimumTeeTcbSvn(bytes(16))
    with pytest.raises(ConfigError, match="must be 16 bytes"):
        policy_from_toml('platforms = ["tdx"]\n[tdx]\nmin_tee_tcb_svn = "0300"\n')
    with pytest.raises(ConfigError, match="'zz' is not hex"):
        policy_from_toml('platforms = ["tdx"]\n[tdx]\nmin_tee_tcb_svn = "zz"\n')


def test_a_policy_file_keeps_the_default_floors_unless_it_sets_its_own() -> None:
    """docs/attestation-policy.md: an empty file is the default policy; absent keys take
    the defaults, the TCB floors included."""
    claims = verify_tdx_at_time(raw("tdx/go-tdx-guest/quote_v5_sample.dat"), now=NOW)
    zero = _with_svn(claims, "00" * 16)
    for text in (
        "",
        'platforms = ["tdx"]\n',
        'platforms = ["tdx"]\n[tdx]\nxfam = "e702060000000000"\n',
    ):
        policy = policy_from_toml(text)
        policy.verify(claims)
        with pytest.raises(PolicyError, match="below the floor 0300020"):
            policy.verify(zero)
    # A floor of its own, even in one alternative, replaces the default for the file.
    low = "00000100000000000000000000000000"
    own = policy_from_toml(
        f'platforms = ["tdx"]\n[[any_of]]\n[any_of.tdx]\nmin_tee_tcb_svn = "{low}"\n'
    )
    own.verify(_with_svn(claims, "00000100000000000000000000000000"))
    with pytest.raises(PolicyError, match="byte 2: 0 < 1"):
        own.verify(zero)


def test_a_policy_file_keeps_the_snp_floor_too() -> None:
    from sealserve.attestation.snp_certs import VCEK_GUID, CertTable, TrustedRoots
    from sealserve.attestation.snp_verify import verify_snp_at_time
    from tests.attestation.conftest import NOW as SNP_NOW
    from tests.attestation.conftest import SIGNERS, read_vector

    rel = "sev-snp/trustee/test-report.bin"
    claims = verify_snp_at_time(
        read_vector(rel), roots=TrustedRoots.amd(), now=SNP_NOW,
        cert_table=CertTable.build({VCEK_GUID: SIGNERS[rel]}).to_bytes(),
    )  # fmt: skip
    low = dataclasses.replace(
        claims,
        fields={**claims.fields, "reported_tcb": {**claims.fields["reported_tcb"], "snp": 0}},
    )
    policy_from_toml("").verify(claims)
    with pytest.raises(PolicyError, match="snp = 0 is below the minimum 8"):
        policy_from_toml("").verify(low)
    policy_from_toml("[sev-snp]\nmin_tcb = { bl = 1 }\n").verify(low)
