"""Composable attestation policies and the TOML policy file.

Over 400 lines: each policy is small; the TOML file maps onto all of them.

A policy is an object with ``verify(claims) -> None`` that raises
:class:`~sealserve.errors.PolicyError` naming what failed. Policies see only claims.
``AllOf`` / ``AnyOf`` combine them; an empty list fails. The file format is documented
in docs/attestation-policy.md; the loader is table-driven (``RULES`` for top-level and
``[[any_of]]`` keys, ``SECTIONS`` for per-platform tables) so another platform adds a
section without touching the loader.
"""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealserve.attestation.claims import Claims, Platform, Policy
from sealserve.errors import ConfigError, PolicyError

REAL_PLATFORMS = frozenset({Platform.SEV_SNP, Platform.TDX})
SNP_PLATFORMS = frozenset({Platform.SEV_SNP, Platform.SIMULATED_SNP})
# Claims that carry SEV-SNP fields (guest policy, TCB): Azure's paravisor report is one.
SNP_FIELD_PLATFORMS = SNP_PLATFORMS | {Platform.AZURE_VTPM}
GENUINE_SNP = frozenset({Platform.SEV_SNP, Platform.AZURE_VTPM})
TCB_COMPONENTS = ("bl", "tee", "snp", "ucode", "fmc")


class UnsafePolicyWarning(UserWarning):
    """A policy that accepts evidence no real deployment should accept was used."""


@dataclass(frozen=True)
class AllOf:
    """Every policy must pass. An empty list fails."""

    policies: Sequence[Policy]

    def verify(self, claims: Claims) -> None:
        if not self.policies:
            raise PolicyError("AllOf: the policy list is empty (nothing was allowed)")
        for policy in self.policies:
            policy.verify(claims)


@dataclass(frozen=True)
class AnyOf:
    """At least one policy must pass. An empty list fails."""

    policies: Sequence[Policy]

    def verify(self, claims: Claims) -> None:
        if not self.policies:
            raise PolicyError("AnyOf: the policy list is empty (nothing was allowed)")
        reasons = []
        for policy in self.policies:
            try:
                policy.verify(claims)
                return
            except PolicyError as exc:
                reasons.append(exc.message)
        joined = "; ".join(f"[{i}] {r}" for i, r in enumerate(reasons, 1))
        raise PolicyError(f"AnyOf: no alternative passed: {joined}")


@dataclass(frozen=True)
class OnPlatforms:
    """Apply ``policy`` only to claims from ``platforms``; others pass this rule."""

    platforms: frozenset[Platform]
    policy: Policy

    def verify(self, claims: Claims) -> None:
        if claims.platform in self.platforms:
            self.policy.verify(claims)


@dataclass(frozen=True)
class PlatformSections:
    """Per-platform rules, default deny: claims are judged by their own platform's
    section, and claims from a platform with no section are refused. (A section never
    passes claims of another platform: an SNP measurement says nothing about a TD.)"""

    sections: Mapping[Platform, Policy]
    names: Mapping[Platform, str]

    def verify(self, claims: Claims) -> None:
        policy = self.sections.get(claims.platform)
        if policy is None:
            have = ", ".join(f"[{n}]" for n in sorted(set(self.names.values())))
            raise PolicyError(
                f"platform {claims.platform.value}: the policy has no section for it "
                f"(it has {have}); evidence from a platform without rules is refused"
            )
        policy.verify(claims)


@dataclass(frozen=True)
class NoPlatformRules:
    """An explicitly empty platform section: the platform is allowed with no rules of
    its own (the table's other rules still apply)."""

    def verify(self, claims: Claims) -> None:
        return None


@dataclass(frozen=True)
class PlatformIn:
    """The evidence comes from one of ``platforms`` (real TEEs only; for the
    simulated platform use :class:`UnsafeAllowSimulated`)."""

    platforms: frozenset[Platform]

    def __post_init__(self) -> None:
        object.__setattr__(self, "platforms", frozenset(Platform(p) for p in self.platforms))
        if Platform.SIMULATED_SNP in self.platforms:
            raise ConfigError(
                "PlatformIn cannot allow simulated evidence; use UnsafeAllowSimulated "
                "(policy file: unsafe_allow_simulated = true)"
            )

    def verify(self, claims: Claims) -> None:
        if claims.platform not in self.platforms:
            allowed = ", ".join(sorted(p.value for p in self.platforms))
            raise PolicyError(
                f"platform {claims.platform.value} is not allowed (allowed: {allowed})"
                + (": simulated evidence is not a real TEE" if claims.simulated else "")
            )


@dataclass(frozen=True)
class UnsafeAllowSimulated:
    """UNSAFE: accept simulated SEV-SNP evidence. For development only; warns on
    every use. It passes only simulated claims; combine with other rules in AnyOf."""

    def verify(self, claims: Claims) -> None:
        warnings.warn(
            "UnsafeAllowSimulated: accepting SIMULATED evidence, which proves nothing "
            "about the hardware; never use this in production",
            UnsafePolicyWarning,
            stacklevel=2,
        )
        if not claims.simulated:
            raise PolicyError(f"UnsafeAllowSimulated: {claims.platform.value} is not simulated")


@dataclass(frozen=True)
class DebugDisallowed:
    """The guest must not be debuggable."""

    def verify(self, claims: Claims) -> None:
        if claims.debug:
            if claims.platform in SNP_FIELD_PLATFORMS:
                raise PolicyError("DEBUG policy bit is set: debug guests are not allowed")
            raise PolicyError(
                f"DEBUG attribute is set on the {claims.platform.value} guest: "
                "debug guests are not allowed"
            )


@dataclass(frozen=True)
class MigrationAgentDisallowed:
    """SEV-SNP: the guest policy must not allow a migration agent (MIGRATE_MA)."""

    def verify(self, claims: Claims) -> None:
        value = _claim(claims, "policy_migrate_ma")
        if value is not False:
            raise PolicyError(
                "MIGRATE_MA policy bit is set: guests that allow a migration agent are not allowed"
            )


@dataclass(frozen=True)
class MeasurementIn:
    """``claims.measurements[register]`` is one of ``allowed`` (bytes or hex)."""

    register: str = "measurement"
    allowed: Iterable[bytes | str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "allowed",
            frozenset(_to_bytes(v, what=f"{self.register} value") for v in self.allowed),
        )

    def verify(self, claims: Claims) -> None:
        value = claims.measurements.get(self.register)
        if value is None:
            raise PolicyError(f"{self.register}: the claims carry no such measurement register")
        if not self.allowed:
            raise PolicyError(f"{self.register}: the allowed list is empty")
        if value not in self.allowed:  # type: ignore[operator]
            raise PolicyError(f"{self.register} {value.hex()} is not in the allowed list")


@dataclass(frozen=True)
class MinimumTcb:
    """Each given component of REPORTED_TCB is at least the given SPL."""

    bl: int | None = None
    tee: int | None = None
    snp: int | None = None
    ucode: int | None = None
    fmc: int | None = None

    def verify(self, claims: Claims) -> None:
        tcb = _claim(claims, "reported_tcb")
        if not isinstance(tcb, Mapping):
            raise PolicyError("reported_tcb: the claims carry no TCB")
        for name in TCB_COMPONENTS:
            minimum = getattr(self, name)
            if minimum is None:
                continue
            value = tcb.get(name)
            if value is None:
                raise PolicyError(f"TCB component {name} is missing from reported_tcb")
            if value < minimum:
                raise PolicyError(f"TCB component {name} = {value} is below the minimum {minimum}")


@dataclass(frozen=True)
class MinimumGuestSvn:
    minimum: int

    def verify(self, claims: Claims) -> None:
        svn = _claim(claims, "guest_svn")
        if not isinstance(svn, int) or svn < self.minimum:
            raise PolicyError(f"guest_svn {svn} is below the minimum {self.minimum}")


@dataclass(frozen=True)
class Vmpl:
    """The report was requested at one of the ``allowed`` VMPLs."""

    allowed: frozenset[int]

    def verify(self, claims: Claims) -> None:
        vmpl = _claim(claims, "vmpl")
        if vmpl not in self.allowed:
            raise PolicyError(f"VMPL {vmpl} is not allowed (allowed: {sorted(self.allowed)})")


@dataclass(frozen=True)
class ReportDataEquals:
    expected: bytes

    def verify(self, claims: Claims) -> None:
        if claims.report_data != self.expected:
            raise PolicyError("report_data does not equal the expected value")


@dataclass(frozen=True)
class ManifestDigestIn:
    """The SHA-256 of the workload manifest is one of ``allowed`` (bytes or hex)."""

    allowed: Iterable[bytes | str]

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "allowed", frozenset(_to_bytes(v, what="manifest digest") for v in self.allowed)
        )

    def verify(self, claims: Claims) -> None:
        digest = claims.manifest_digest
        if digest is None:
            raise PolicyError("manifest_digest: the evidence carried no workload manifest")
        if digest not in self.allowed:  # type: ignore[operator]
            raise PolicyError(f"manifest digest {digest.hex()} is not in the allowed list")


def _claim(claims: Claims, name: str) -> Any:
    if name not in claims.fields:
        raise PolicyError(f"{name}: the claims carry no such field ({claims.platform.value})")
    return claims.fields[name]


def _to_bytes(value: bytes | str, *, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return bytes.fromhex(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {value!r} is not hex") from exc


def _starter_tcb() -> MinimumTcb:
    from sealserve.attestation.launch import STARTER_MIN_TCB

    return MinimumTcb(**STARTER_MIN_TCB)


def _starter_tdx_tcb() -> Policy:
    from sealserve.attestation.launch import STARTER_MIN_TEE_TCB_SVN
    from sealserve.attestation.tdx_policy import MinimumTeeTcbSvn

    return MinimumTeeTcbSvn(bytes.fromhex(STARTER_MIN_TEE_TCB_SVN))


DEFAULT_POLICY: Policy = AllOf(
    [
        PlatformIn(REAL_PLATFORMS),
        DebugDisallowed(),
        OnPlatforms(SNP_FIELD_PLATFORMS, MigrationAgentDisallowed()),
        OnPlatforms(GENUINE_SNP, _starter_tcb()),
        OnPlatforms(frozenset({Platform.TDX}), _starter_tdx_tcb()),
    ]
)
"""Real TEEs only (simulated evidence is refused), no debug guests, no SEV-SNP
migration agent, TCB floors: SEV-SNP ``launch.STARTER_MIN_TCB``, TDX
``launch.STARTER_MIN_TEE_TCB_SVN``. It pins no measurement: deployments add their
reference values."""


# --- the TOML file: table-driven ------------------------------------------------------

Builder = Callable[[Any, str], Policy | None]


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is int:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _list(value: Any, item: type, where: str) -> list[Any]:
    _typed(value, list, where)
    return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]


def _hexes(value: Any, where: str, *, size: int | None = None) -> list[bytes]:
    out = []
    for i, item in enumerate(_list(value, str, where)):
        raw = _to_bytes(item, what=f"{where}[{i}]")
        if size is not None and len(raw) != size:
            raise ConfigError(f"{where}[{i}]: expected {size} bytes, got {len(raw)}")
        out.append(raw)
    if not out:
        raise ConfigError(f"{where}: the list is empty (nothing would be allowed)")
    return out


def _platforms(value: Any, where: str) -> Policy:
    names = _list(value, str, where)
    try:
        platforms = frozenset(Platform(n) for n in names)
    except ValueError as exc:
        raise ConfigError(f"{where}: unknown platform in {names} ({exc})") from exc
    return PlatformIn(platforms)


def _min_tcb(value: Any, where: str) -> Policy:
    table = _typed(value, dict, where)
    for key in table:
        if key not in TCB_COMPONENTS:
            raise ConfigError(
                f"{where}: unknown TCB component {key!r} ({', '.join(TCB_COMPONENTS)})"
            )
    return MinimumTcb(**{k: _typed(v, int, f"{where}.{k}") for k, v in table.items()})


def _measurements(value: Any, where: str) -> Policy:
    table = _typed(value, dict, where)
    if not table:
        raise ConfigError(f"{where}: empty table")
    return AllOf([MeasurementIn(reg, _hexes(v, f"{where}.{reg}")) for reg, v in table.items()])


# Rules valid in a [sev-snp] section (apply to SEV-SNP and simulated SEV-SNP claims).
SNP_RULES: dict[str, Builder] = {
    "measurement": lambda v, w: MeasurementIn("measurement", _hexes(v, w, size=48)),
    "min_tcb": _min_tcb,
    "min_guest_svn": lambda v, w: MinimumGuestSvn(_typed(v, int, w)),
    "vmpl": lambda v, w: Vmpl(frozenset(_list(v, int, w))),
    "allow_migration_agent": lambda v, w: (
        None if _typed(v, bool, w) else MigrationAgentDisallowed()
    ),
}


def _tdx_rules() -> dict[str, Builder]:
    from sealserve.attestation import tdx_policy as t

    def values(cls: Any) -> Builder:
        return lambda v, w: cls.from_toml({"values": v})

    def masked(cls: Any) -> Builder:
        return lambda v, w: cls.from_toml(v if isinstance(v, dict) else {"value": v})

    rules: dict[str, Builder] = {
        reg: (lambda r: lambda v, w: MeasurementIn(r, _hexes(v, w, size=48)))(reg)
        for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
    }
    rules.update(
        {
            "tcb_status": lambda v, w: t.TcbStatusIn.from_toml({"allowed": v}),
            "advisory_ids_denied": lambda v, w: t.AdvisoryIdsNotIn.from_toml({"denied": v}),
            "mrconfigid": values(t.MrConfigIdIn),
            "mrowner": values(t.MrOwnerIn),
            "mrownerconfig": values(t.MrOwnerConfigIn),
            "mrseam": values(t.MrSeamIn),
            "xfam": masked(t.XfamEquals),
            "td_attributes": masked(t.TdAttributesEqual),
            "min_tee_tcb_svn": lambda v, w: t.MinimumTeeTcbSvn.from_toml({"minimum": v}),
        }
    )
    return rules


# Rules valid in an [azure-vtpm] section: the paravisor's SNP report (the SEV-SNP
# rules) and the guest's own boot, measured into the vTPM's SHA-256 PCRs.
AZURE_VTPM_RULES: dict[str, Builder] = {
    **SNP_RULES,
    **{
        f"pcr{i}": (lambda r: lambda v, w: MeasurementIn(r, _hexes(v, w, size=32)))(f"pcr{i}")
        for i in range(24)
    },
}

# Per-platform sections: name -> (platforms the rules apply to, rule table).
SECTIONS: dict[str, tuple[frozenset[Platform], dict[str, Builder]]] = {
    "sev-snp": (SNP_PLATFORMS, SNP_RULES),
    "azure-vtpm": (frozenset({Platform.AZURE_VTPM}), AZURE_VTPM_RULES),
    "tdx": (frozenset({Platform.TDX}), _tdx_rules()),
}

# Rules valid at the top level and inside [[any_of]] entries.
RULES: dict[str, Builder] = {
    "platforms": _platforms,
    "unsafe_allow_simulated": lambda v, w: UnsafeAllowSimulated() if _typed(v, bool, w) else None,
    "allow_debug": lambda v, w: None if _typed(v, bool, w) else DebugDisallowed(),
    "report_data": lambda v, w: ReportDataEquals(_hexes([v], w, size=64)[0]),
    "manifest_digests": lambda v, w: ManifestDigestIn(_hexes(v, w, size=32)),
    "measurements": _measurements,
}


def _rule_table(table: Mapping[str, Any], where: str, *, top: bool = False) -> list[Policy]:
    policies: list[Policy] = []
    platform_rule: Policy | None = None
    simulated: Policy | None = None
    sections: dict[Platform, Policy] = {}
    names: dict[Platform, str] = {}
    for key, value in table.items():
        at = f"{where}{key}"
        if top and key in ("version", "any_of"):
            continue
        if key in SECTIONS:
            platforms, rules = SECTIONS[key]
            section = _typed(value, dict, at)
            inner = _apply(section, rules, f"{at}.")
            for platform in platforms:
                sections[platform] = AllOf(inner) if inner else NoPlatformRules()
                names[platform] = key
            continue
        if key not in RULES:
            known = ", ".join(sorted([*RULES, *SECTIONS, *(["any_of"] if top else [])]))
            raise ConfigError(f"policy: unknown key {at!r} (known: {known})")
        built = RULES[key](value, at)
        if key == "platforms":
            platform_rule = built
        elif key == "unsafe_allow_simulated":
            simulated = built
        elif built is not None:
            policies.append(built)
    if sections:
        policies.append(PlatformSections(sections, names))
    if simulated is not None:
        policies.insert(0, AnyOf([p for p in (platform_rule, simulated) if p is not None]))
    elif platform_rule is not None:
        policies.insert(0, platform_rule)
    return policies


def _apply(table: Mapping[str, Any], rules: Mapping[str, Builder], where: str) -> list[Policy]:
    out = []
    for key, value in table.items():
        if key not in rules:
            raise ConfigError(
                f"policy: unknown key {where}{key} (known: {', '.join(sorted(rules))})"
            )
        built = rules[key](value, f"{where}{key}")
        if built is not None:
            out.append(built)
    return out


POLICY_FORMAT_VERSION = 1


def policy_from_toml(text: str) -> Policy:
    """Build a policy from the TOML format of docs/attestation-policy.md.

    Top-level defaults (when a key is absent): ``platforms = ["sev-snp", "tdx"]`` unless
    ``unsafe_allow_simulated`` is given (then the simulated platform only: naming it
    never opens the real platforms too; ``azure-vtpm`` is allowed only when named),
    ``allow_debug = false``, ``[sev-snp]`` and ``[azure-vtpm]``
    ``allow_migration_agent = false``. Each ``[[any_of]]`` entry is a rule table; at
    least one must pass. In a table that has platform sections (``[sev-snp]``,
    ``[tdx]``, ``[azure-vtpm]``), claims are judged by their own platform's section and
    refused when it has none (:class:`PlatformSections`).

    Raises ConfigError naming the offending key on bad TOML, unknown keys or bad values.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy: not valid TOML: {exc}") from exc
    version = doc.get("version", POLICY_FORMAT_VERSION)
    if version != POLICY_FORMAT_VERSION:
        raise ConfigError(f"policy: unsupported version {version!r} (this sealserve reads 1)")
    defaults: dict[str, Any] = {"allow_debug": False}
    # Only a true unsafe_allow_simulated drops the default: `= false` must not open
    # every platform (azure-vtpm included) to a policy that names none.
    if doc.get("unsafe_allow_simulated") is not True:
        defaults["platforms"] = sorted(p.value for p in REAL_PLATFORMS)
    top = {**defaults, **{k: v for k, v in doc.items() if k != "any_of"}}
    # The migration-agent default is its own rule: it must not make a [sev-snp] section
    # appear, which would refuse every platform without one.
    policies = _rule_table(top, "", top=True)
    for section, platforms in (
        ("sev-snp", SNP_PLATFORMS),
        ("azure-vtpm", frozenset({Platform.AZURE_VTPM})),
    ):
        table = _typed(top.get(section, {}), dict, section)
        if table.get("allow_migration_agent", False) is False:
            policies.append(OnPlatforms(platforms, MigrationAgentDisallowed()))
    # The TCB floors of DEFAULT_POLICY hold unless the file sets its own (anywhere: a
    # floor in one [[any_of]] alternative replaces the default for the whole file).
    if not _sets(doc, "sev-snp", "min_tcb"):
        policies.append(OnPlatforms(frozenset({Platform.SEV_SNP}), _starter_tcb()))
    if not _sets(doc, "azure-vtpm", "min_tcb"):
        policies.append(OnPlatforms(frozenset({Platform.AZURE_VTPM}), _starter_tcb()))
    if not _sets(doc, "tdx", "min_tee_tcb_svn"):
        policies.append(OnPlatforms(frozenset({Platform.TDX}), _starter_tdx_tcb()))
    if "any_of" in doc:
        entries = _typed(doc["any_of"], list, "any_of")
        alternatives: list[Policy] = []
        for i, entry in enumerate(entries):
            rules = _rule_table(_typed(entry, dict, f"any_of[{i}]"), f"any_of[{i}].")
            if not rules:
                raise ConfigError(f"policy: any_of[{i}] has no rules (it would allow anything)")
            alternatives.append(AllOf(rules))
        policies.append(AnyOf(alternatives))
    return AllOf(policies)


def _sets(doc: Mapping[str, Any], section: str, key: str) -> bool:
    tables = [doc, *(e for e in doc.get("any_of", []) or [] if isinstance(e, dict))]
    return any(isinstance(t.get(section), dict) and key in t[section] for t in tables)


def load_policy(path: str | Path) -> Policy:
    """Read a policy file. Raises ConfigError if it cannot be read or is invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy: cannot read {path}: {exc}") from exc
    try:
        return policy_from_toml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from exc
