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
