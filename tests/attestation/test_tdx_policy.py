"""TDX-specific policy rules over claims from the genuine vectors."""

from __future__ import annotations

from typing import Any

import pytest

from sealserve.attestation.claims import Claims, Platform
from sealserve.attestation.tdx import verify_tdx_at_time
from sealserve.attestation.tdx_collateral import TcbInfo, TdxCollateral
from sealserve.attestation.tdx_policy import (
    TDX_RULES,
    AdvisoryIdsNotIn,
    MrConfigIdIn,
    MrOwnerConfigIn,
    MrOwnerIn,
    MrSeamIn,
    TcbStatusIn,
    TdAttributesEqual,
    XfamEquals,
    tdx_rule_from_toml,
)
from sealserve.errors import ConfigError, PolicyError

from ._tdx_util import DCAP_COLLATERAL, DCAP_QUOTE, EXPECTED, GO, NOW, NOW_2026_02, NOW_DCAP, raw

V5 = "tdx/go-tdx-guest/quote_v5_sample.dat"
DEBUG = "tdx/trustee/tdx_quote_4.dat"
ZERO48 = bytes(48)


@pytest.fixture(scope="module")
def v5_claims() -> Claims:
    info = TcbInfo.from_json(GO / "sample_tcbinfo_response_v5")
    return verify_tdx_at_time(raw(V5), now=NOW_2026_02, collateral=TdxCollateral(tcb_info=info))


@pytest.fixture(scope="module")
def verified_claims() -> Claims:
    collateral = TdxCollateral.from_dcap_json(DCAP_COLLATERAL)
    return verify_tdx_at_time(DCAP_QUOTE.read_bytes(), now=NOW_DCAP, collateral=collateral)


@pytest.fixture(scope="module")
def bare_claims() -> Claims:
    return verify_tdx_at_time(raw(V5), now=NOW)


def _snp_claims() -> Claims:
    return Claims(
        platform=Platform.SEV_SNP,
        report_data=bytes(64),
        debug=False,
        measurements={"measurement": bytes(48)},
        fields={"tcb_status": "UpToDate", "mrconfigid": "00" * 48},
    )


def test_tcb_status_in(verified_claims: Claims, bare_claims: Claims) -> None:
    TcbStatusIn(allowed=frozenset({"UpToDate"})).verify(verified_claims)
    with pytest.raises(PolicyError, match="TCB status UpToDate is not one of OutOfDate") as exc:
        TcbStatusIn(allowed=frozenset({"OutOfDate"})).verify(verified_claims)
    assert exc.value.check == "tdx.tcb_status_in"
    with pytest.raises(PolicyError, match="not evaluated"):
        TcbStatusIn(allowed=frozenset({"UpToDate"})).verify(bare_claims)


def test_tcb_rules_refuse_unverified_collateral(v5_claims: Claims) -> None:
    # TCB info without its issuer chain: evaluated and shown, but proves nothing.
    assert v5_claims.fields["tcb_status"] == "UpToDate"
    assert v5_claims.fields["collateral_verified"] is False
    for rule in (
        TcbStatusIn(allowed=frozenset({"UpToDate"})),
        AdvisoryIdsNotIn(denied=frozenset({"INTEL-SA-00837"})),
    ):
        with pytest.raises(PolicyError, match="not read from verified collateral"):
            rule.verify(v5_claims)


def test_rules_refuse_other_platforms() -> None:
    for rule in (
        TcbStatusIn(allowed=frozenset({"UpToDate"})),
        MrConfigIdIn(values=frozenset({ZERO48})),
    ):
        with pytest.raises(PolicyError, match="requires Intel TDX evidence, got sev-snp"):
            rule.verify(_snp_claims())


def test_tcb_status_names_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown TCB status"):
        TcbStatusIn(allowed=frozenset({"Fine"}))
    with pytest.raises(ConfigError, match="empty"):
        TcbStatusIn(allowed=frozenset())


def test_advisory_ids_not_in(verified_claims: Claims, bare_claims: Claims) -> None:
    AdvisoryIdsNotIn(denied=frozenset({"INTEL-SA-00837"})).verify(verified_claims)
    edited = Claims(
        platform=Platform.TDX,
        report_data=bytes(64),
        debug=False,
        measurements={},
        fields={**verified_claims.fields, "tcb_advisory_ids": ["INTEL-SA-00837"]},
    )
    with pytest.raises(PolicyError, match="affected by INTEL-SA-00837"):
        AdvisoryIdsNotIn(denied=frozenset({"INTEL-SA-00837"})).verify(edited)
    with pytest.raises(PolicyError, match="no tcb_advisory_ids"):
        AdvisoryIdsNotIn(denied=frozenset({"X"})).verify(bare_claims)


@pytest.mark.parametrize(
    ("cls", "field"),
    [
        (MrConfigIdIn, "mrconfigid"),
        (MrOwnerIn, "mrowner"),
        (MrOwnerConfigIn, "mrownerconfig"),
        (MrSeamIn, "mrseam"),
    ],
)
def test_hex_field_rules(bare_claims: Claims, cls: Any, field: str) -> None:
    have = bytes.fromhex(EXPECTED[V5][field])
    cls(values=frozenset({have})).verify(bare_claims)
    with pytest.raises(PolicyError, match="is not one of the 1 allowed") as exc:
        cls(values=frozenset({b"\x01" * 48})).verify(bare_claims)
    assert exc.value.check == cls.rule
    built = cls.from_toml({"rule": cls.rule, "values": [have.hex()]})
    built.verify(bare_claims)


def test_xfam_and_td_attributes(bare_claims: Claims) -> None:
    XfamEquals(value=bytes.fromhex("e702060000000000")).verify(bare_claims)
    with pytest.raises(PolicyError, match="XFAM e702060000000000"):
        XfamEquals(value=bytes.fromhex("e742060000000000")).verify(bare_claims)
    # TDATTRIBUTES 0000001000000000: SEPT_VE_DISABLE (bit 28) is set.
    sept = bytes.fromhex("0000001000000000")
    TdAttributesEqual(value=sept, mask=sept).verify(bare_claims)
    with pytest.raises(PolicyError, match="TDATTRIBUTES"):
        TdAttributesEqual(value=bytes(8), mask=sept).verify(bare_claims)


def test_debug_td_attributes_rule() -> None:
    claims = verify_tdx_at_time(raw(DEBUG), now=NOW)
    assert claims.debug is True and claims.fields["td_debug"] is True
    no_debug = TdAttributesEqual(value=bytes(8), mask=bytes.fromhex("0100000000000000"))
    with pytest.raises(PolicyError, match="TDATTRIBUTES 0100001000000000"):
        no_debug.verify(claims)


def test_from_toml_and_dispatch(verified_claims: Claims) -> None:
    rule = tdx_rule_from_toml({"rule": "tdx.tcb_status_in", "allowed": ["UpToDate"]})
    rule.verify(verified_claims)
    xfam = tdx_rule_from_toml({"rule": "tdx.xfam_equals", "value": "e702060000000000"})
    assert isinstance(xfam, XfamEquals) and xfam.mask == b"\xff" * 8
    assert set(TDX_RULES) == {
        "tdx.tcb_status_in",
        "tdx.advisory_ids_not_in",
        "tdx.mrconfigid_in",
        "tdx.mrowner_in",
        "tdx.mrownerconfig_in",
        "tdx.mrseam_in",
        "tdx.xfam_equals",
        "tdx.td_attributes_equal",
        "tdx.min_tee_tcb_svn",
    }


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rule": "tdx.nope"}, "unknown TDX policy rule 'tdx.nope'"),
        ({"rule": "tdx.tcb_status_in", "allowed": "UpToDate"}, "must be a list"),
        ({"rule": "tdx.tcb_status_in", "allowed": ["UpToDate"], "typo": 1}, "unknown key"),
        ({"rule": "tdx.mrconfigid_in", "values": []}, "non-empty list"),
        ({"rule": "tdx.mrconfigid_in", "values": ["zz"]}, "not hex"),
        ({"rule": "tdx.mrconfigid_in", "values": ["00"]}, "must be 48 bytes"),
        ({"rule": "tdx.xfam_equals"}, "'value' is required"),
        ({"rule": "tdx.xfam_equals", "value": "00"}, "must be 8 bytes"),
    ],
)
def test_from_toml_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tdx_rule_from_toml(table)


ZERO_HEX = "00" * 48
PROPOSED_TOML = f"""
[[policy.any_of]]
platform = "tdx"
[[policy.any_of.rules]]
rule = "tdx.tcb_status_in"
allowed = ["UpToDate", "SWHardeningNeeded"]
[[policy.any_of.rules]]
rule = "tdx.mrconfigid_in"
values = ["{ZERO_HEX}"]
[[policy.any_of.rules]]
rule = "tdx.xfam_equals"
value = "e702060000000000"
"""


def test_proposed_toml_shape_builds_rules(v5_claims: Claims, verified_claims: Claims) -> None:
    # The shape proposed in docs/tdx.md: the tdx.* tables build with tdx_rule_from_toml.
    import tomllib

    doc = tomllib.loads(PROPOSED_TOML)
    rules = [tdx_rule_from_toml(t) for t in doc["policy"]["any_of"][0]["rules"]]
    assert [type(r) for r in rules] == [TcbStatusIn, MrConfigIdIn, XfamEquals]
    for r in rules:
        r.verify(verified_claims if isinstance(r, TcbStatusIn) else v5_claims)
