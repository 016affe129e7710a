"""Release policies that cannot be weaker than meant.

A key's release policy is *complete* when every way it can pass (the top level, or the
top level together with each ``[[any_of]]`` entry) names:

1. its platform(s): ``platforms = [...]``, or ``unsafe_allow_simulated = true`` for the
   simulated platform (there is no default: an omitted list would accept every TEE);
2. for each platform, a trusted root in the key's ``roots``: ``amd`` for SEV-SNP,
   ``intel`` for TDX, ``unsafe-simulated`` for the simulated platform;
3. for each platform, a launch measurement: SEV-SNP and simulated SEV-SNP
   ``[sev-snp] measurement``; TDX ``[tdx] mrtd`` and ``rtmr0``..``rtmr2`` (firmware
   configuration, kernel, command line and initrd; RTMR3 is extended at run time);
   Azure CVMs ``[azure-vtpm] measurement`` (the paravisor) and ``pcr4``, ``pcr7``,
   ``pcr8``, ``pcr9``, ``pcr11``, ``pcr12`` (boot loader or UKI, Secure Boot state,
   GRUB's command line and files, UKI contents, systemd-stub's additions).

Without these a genuine guest running any code, or a genuine TD of anyone's on any
Intel host, would get the key. The broker refuses an incomplete policy unless the
admin passes ``unsafe_allow_incomplete`` (logged as UNSAFE on every use).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from sealserve.attestation.claims import Platform
from sealserve.broker.store import ROOT_AMD, ROOT_INTEL, ROOT_SIMULATED
from sealserve.errors import ConfigError

# The root a platform's evidence chains to once verified: SEV-SNP to AMD's ARK, TDX to
# Intel's SGX root CA (pinned in the TDX verifier), simulated SEV-SNP to the local root.
ROOT_FOR_PLATFORM: Mapping[Platform, str] = {
    Platform.SEV_SNP: ROOT_AMD,
    Platform.TDX: ROOT_INTEL,
    Platform.SIMULATED_SNP: ROOT_SIMULATED,
    # Azure's paravisor report is an SEV-SNP report, signed by AMD's VCEK.
    Platform.AZURE_VTPM: ROOT_AMD,
}
# The launch measurement registers a policy must pin, per platform and section.
LAUNCH_REGISTERS: Mapping[Platform, tuple[str, tuple[str, ...]]] = {
    Platform.SEV_SNP: ("sev-snp", ("measurement",)),
    Platform.SIMULATED_SNP: ("sev-snp", ("measurement",)),
    Platform.TDX: ("tdx", ("mrtd", "rtmr0", "rtmr1", "rtmr2")),
    # The paravisor (SNP measurement) and the guest's boot in the vTPM: boot loader or
    # UKI (PCR 4), Secure Boot state (PCR 7), GRUB's command line and files (PCRs 8, 9),
    # UKI kernel/initrd/command line (PCR 11), systemd-stub's extra command line and
    # credentials (PCR 12). Each boot path leaves some of them zero: pinning the zero is
    # what keeps another path (GRUB instead of a UKI, an added command line) out.
    Platform.AZURE_VTPM: (
        "azure-vtpm", ("measurement", "pcr4", "pcr7", "pcr8", "pcr9", "pcr11", "pcr12")
    ),
}


def policy_gaps(policy_toml: str, roots: Iterable[str]) -> list[str]:
    """What the policy (with the key's ``roots``) leaves open; empty when complete.

    Raises ConfigError when the text is not TOML (validate it with the policy loader
    first for the other errors).
    """
    try:
        doc = tomllib.loads(policy_toml)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy: not valid TOML: {exc}") from exc
    root_set = set(roots)
    top = {k: v for k, v in doc.items() if k != "any_of"}
    entries = doc.get("any_of")
    branches: list[tuple[str, dict[str, Any]]] = [("", top)]
    gaps: list[str] = []
    if entries is not None and not (isinstance(entries, list) and entries):
        gaps.append("any_of: must be a non-empty list of alternatives")
    elif isinstance(entries, list):
        branches = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                branches.append((f"any_of[{i}]: ", _merge(top, entry)))
            else:
                gaps.append(f"any_of[{i}]: not a table of rules")
    for where, branch in branches:
        gaps.extend(where + gap for gap in _branch_gaps(branch, root_set))
    return list(dict.fromkeys(gaps))


def require_complete(
    policy_toml: str, roots: Iterable[str], *, unsafe_allow_incomplete: bool = False
) -> list[str]:
    """Raise ConfigError naming the first missing part of an incomplete policy, unless
    ``unsafe_allow_incomplete``; returns the missing parts (empty when complete)."""
    gaps = policy_gaps(policy_toml, roots)
    if gaps and not unsafe_allow_incomplete:
        more = f" (and {len(gaps) - 1} more: {'; '.join(gaps[1:])})" if len(gaps) > 1 else ""
        raise ConfigError(
            f"release policy is incomplete: {gaps[0]}{more}",
            remedy="Name the platform(s), the trusted root for each and its launch "
            "measurement (`sealserve measure --launch ... --policy-out` writes such a "
            "policy); see docs/key-broker.md. Only for a throwaway test: "
            "--unsafe-allow-incomplete-policy.",
        )
    return gaps


def _merge(top: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(top)
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _branch_gaps(branch: Mapping[str, Any], roots: set[str]) -> list[str]:
    platforms: list[Platform] = []
    named = branch.get("platforms")
    if isinstance(named, list):
        platforms += [Platform(p) for p in named if p in {x.value for x in Platform}]
    if branch.get("unsafe_allow_simulated") is True:
        platforms.append(Platform.SIMULATED_SNP)
    if not platforms:
        return [
            'platforms: the policy names no platform (platforms = ["sev-snp"], ["tdx"] '
            'and/or ["azure-vtpm"]; the simulated platform: unsafe_allow_simulated = true)'
        ]
    gaps = []
    for platform in dict.fromkeys(platforms):
        root = ROOT_FOR_PLATFORM[platform]
        if root not in roots:
            gaps.append(
                f"roots: {platform.value} evidence needs the {root!r} root in the key's roots "
                f"(the key's roots: {', '.join(sorted(roots)) or 'none'})"
            )
        section, registers = LAUNCH_REGISTERS[platform]
        pinned = _pinned(branch, section)
        missing = [r for r in registers if r not in pinned]
        if missing:
            gaps.append(
                f"launch measurement: {platform.value} needs [{section}] "
                f"{', '.join(missing)} (the expected launch measurement)"
            )
    return gaps


def _pinned(branch: Mapping[str, Any], section: str) -> set[str]:
    out = set()
    for table in (branch.get(section), branch.get("measurements")):
        if isinstance(table, dict):
            out |= {k for k, v in table.items() if isinstance(v, list) and v}
    return out
