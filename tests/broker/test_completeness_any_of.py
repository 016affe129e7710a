"""Broker completeness with ``[[any_of]]`` alternatives: every alternative must be
complete on its own (with the top level it sits under), and an incomplete one is
named."""

from __future__ import annotations

import pytest

from sealserve.broker.completeness import policy_gaps, require_complete
from sealserve.errors import ConfigError

R = {r: f'["{str(i + 1) * 96}"]' for i, r in enumerate(("mrtd", "rtmr0", "rtmr1", "rtmr2"))}
SNP = '["' + "ab" * 48 + '"]'


def _tdx(*registers: str) -> str:
    return "\n".join(f"{r} = {R[r]}" for r in registers)


COMPLETE_TDX = 'platforms = ["tdx"]\n[any_of.tdx]\n' + _tdx("mrtd", "rtmr0", "rtmr1", "rtmr2")


def test_every_alternative_complete_is_accepted() -> None:
    text = f"version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\n{COMPLETE_TDX}\n"
    assert policy_gaps(text, ["intel"]) == []
    text = (
        f'version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\nplatforms = ["sev-snp"]\n'
        f"[any_of.sev-snp]\nmeasurement = {SNP}\n"
    )
    assert policy_gaps(text, ["intel", "amd"]) == []


def test_one_incomplete_alternative_is_refused_and_named() -> None:
    weak = 'platforms = ["tdx"]\n[any_of.tdx]\n' + _tdx("mrtd")
    text = f"version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\n{weak}\n"
    assert policy_gaps(text, ["intel"]) == [
        "any_of[1]: launch measurement: tdx needs [tdx] rtmr0, rtmr1, rtmr2 "
        "(the expected launch measurement)"
    ]
    with pytest.raises(ConfigError, match=r"incomplete: any_of\[1\]: launch measurement"):
        require_complete(text, ["intel"])


def test_each_alternative_is_checked_for_platform_and_roots_too() -> None:
    # No platform in the second alternative (and none at the top level).
    text = f"version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\n[any_of.tdx]\n{_tdx('mrtd')}\n"
    gaps = policy_gaps(text, ["intel"])
    assert gaps == [
        'any_of[1]: platforms: the policy names no platform (platforms = ["sev-snp"], ["tdx"] '
        'and/or ["azure-vtpm"]; the simulated platform: unsafe_allow_simulated = true)'
    ]
    # An SEV-SNP alternative under a key whose roots hold only Intel's.
    text = (
        f'version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\nplatforms = ["sev-snp"]\n'
        f"[any_of.sev-snp]\nmeasurement = {SNP}\n"
    )
    assert policy_gaps(text, ["intel"]) == [
        "any_of[1]: roots: sev-snp evidence needs the 'amd' root in the key's roots "
        "(the key's roots: intel)"
    ]
    # An alternative that opens the simulated platform needs its root and measurement.
    text = f"version = 1\n[[any_of]]\n{COMPLETE_TDX}\n[[any_of]]\nunsafe_allow_simulated = true\n"
    gaps = policy_gaps(text, ["intel"])
    assert [g.split(":")[0:2] for g in gaps] == [["any_of[1]", " roots"]] * 1 + [
        ["any_of[1]", " launch measurement"]
    ]


def test_the_top_level_counts_for_every_alternative() -> None:
    # Registers pinned at the top level apply to each alternative (AllOf(top, AnyOf)).
    text = (
        'version = 1\nplatforms = ["tdx"]\n[tdx]\n' + _tdx("mrtd", "rtmr0", "rtmr1") + "\n"
        "[[any_of]]\n[any_of.tdx]\n" + _tdx("rtmr2") + "\n"
        "[[any_of]]\nmanifest_digests = ['" + "00" * 32 + "']\n"
    )
    assert policy_gaps(text, ["intel"]) == [
        "any_of[1]: launch measurement: tdx needs [tdx] rtmr2 (the expected launch measurement)"
    ]


def test_malformed_alternatives_are_gaps_not_passes() -> None:
    assert policy_gaps("version = 1\nany_of = [1, 2]\n", ["intel"]) == [
        "any_of[0]: not a table of rules",
        "any_of[1]: not a table of rules",
    ]
    assert policy_gaps("version = 1\nany_of = []\n", ["intel"])[0] == (
        "any_of: must be a non-empty list of alternatives"
    )
