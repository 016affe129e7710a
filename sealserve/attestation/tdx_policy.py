"""TDX-specific policy rules. Each is a policy (``verify(claims) -> None`` raising
:class:`PolicyError`) over claims made by :func:`sealserve.attestation.tdx.verify_tdx_at_time`,
and each has a ``from_toml(table)`` constructor for the policy file loader.

Generic rules (AllOf / AnyOf, MeasurementIn for MRTD and RTMRs, DebugDisallowed for
TDATTRIBUTES.DEBUG) live with the generic policies; these cover what only TDX has.
Every rule refuses evidence that is not TDX, and refuses when the claim it needs is
missing (default deny): ``TcbStatusIn`` and ``AdvisoryIdsNotIn`` refuse claims verified
without complete, signature-checked collateral (``fields["collateral_verified"]``).

Proposed TOML (one table per rule, ``rule`` names it; see docs/tdx.md)::

    [[policy.rules]]
    rule = "tdx.tcb_status_in"
    allowed = ["UpToDate", "SWHardeningNeeded"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from sealserve.attestation.claims import Claims, Platform, Policy
from sealserve.attestation.tdx_collateral import TCB_STATUSES
from sealserve.errors import ConfigError, PolicyError


def _require_tdx(claims: Claims, rule: str) -> None:
    if claims.platform is not Platform.TDX:
        raise PolicyError(
            f"{rule}: requires Intel TDX evidence, got {claims.platform.value}", check=rule
        )


def _field(claims: Claims, name: str, rule: str) -> Any:
    _require_tdx(claims, rule)
    if name not in claims.fields:
        raise PolicyError(f"{rule}: the claims carry no {name}", check=rule)
    return claims.fields[name]


def _require_verified_collateral(claims: Claims, rule: str) -> None:
    """A TCB status is a fact only when the collateral it came from was verified."""
    if claims.fields.get("collateral_verified") is not True:
        raise PolicyError(
            f"{rule}: the TCB status was not read from verified collateral (supply complete "
            "collateral: TCB info and QE identity with their issuer chain, both CRLs)",
            check=rule,
        )


def _hex_values(table: Mapping[str, Any], key: str, rule: str, size: int) -> frozenset[bytes]:
    raw = table.get(key)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{rule}: '{key}' must be a non-empty list of hex strings")
    return frozenset(_hex_value(v, key, rule, size) for v in raw)


def _hex_value(value: Any, key: str, rule: str, size: int) -> bytes:
    try:
        out = bytes.fromhex(str(value))
    except ValueError as exc:
        raise ConfigError(f"{rule}: '{key}' value {value!r} is not hex") from exc
    if len(out) != size:
        raise ConfigError(f"{rule}: '{key}' value {value!r} must be {size} bytes")
    return out


def _only_keys(table: Mapping[str, Any], allowed: Iterable[str], rule: str) -> None:
    extra = set(table) - set(allowed) - {"rule"}
    if extra:
        raise ConfigError(f"{rule}: unknown key(s) {', '.join(sorted(extra))}")


@dataclass(frozen=True)
class TcbStatusIn:
    """Allow only these TCB statuses (from collateral evaluation; e.g. "UpToDate").

    Refuses claims without a TCB status (verified without TCB info collateral).
    """

    allowed: frozenset[str]
    rule: ClassVar[str] = "tdx.tcb_status_in"

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", frozenset(self.allowed))
        if not self.allowed:
            raise ConfigError(f"{self.rule}: 'allowed' is empty: nothing could pass")
        unknown = self.allowed - TCB_STATUSES
        if unknown:
            raise ConfigError(
                f"{self.rule}: unknown TCB status(es) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(TCB_STATUSES))}"
            )

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> TcbStatusIn:
        """Build from ``{allowed = [...]}``. Raises ConfigError."""
        _only_keys(table, ["allowed"], cls.rule)
        allowed = table.get("allowed")
        if not isinstance(allowed, list) or not all(isinstance(s, str) for s in allowed):
            raise ConfigError(f"{cls.rule}: 'allowed' must be a list of TCB status names")
        return cls(allowed=frozenset(allowed))

    def verify(self, claims: Claims) -> None:
        _require_tdx(claims, self.rule)
        status = claims.fields.get("tcb_status")
        if status is None:
            raise PolicyError(
                f"{self.rule}: TCB status was not evaluated (verify with TCB info collateral)",
                check=self.rule,
            )
        _require_verified_collateral(claims, self.rule)
        if status not in self.allowed:
            advisories = claims.fields.get("tcb_advisory_ids") or []
            note = f" (advisories: {', '.join(advisories)})" if advisories else ""
            raise PolicyError(
                f"{self.rule}: TCB status {status} is not one of "
                f"{', '.join(sorted(self.allowed))}{note}",
                check=self.rule,
            )


@dataclass(frozen=True)
class AdvisoryIdsNotIn:
    """Refuse a TCB level affected by any of these Intel advisories (INTEL-SA-…)."""

    denied: frozenset[str]
    rule: ClassVar[str] = "tdx.advisory_ids_not_in"

    def __post_init__(self) -> None:
        object.__setattr__(self, "denied", frozenset(self.denied))

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> AdvisoryIdsNotIn:
        """Build from ``{denied = ["INTEL-SA-…", ...]}``. Raises ConfigError."""
        _only_keys(table, ["denied"], cls.rule)
        denied = table.get("denied")
        if not isinstance(denied, list) or not all(isinstance(s, str) for s in denied):
            raise ConfigError(f"{cls.rule}: 'denied' must be a list of advisory ids")
        return cls(denied=frozenset(denied))

    def verify(self, claims: Claims) -> None:
        ids = _field(claims, "tcb_advisory_ids", self.rule)
        _require_verified_collateral(claims, self.rule)
        hit = sorted(self.denied & set(ids))
        if hit:
            raise PolicyError(
                f"{self.rule}: the TCB is affected by {', '.join(hit)}", check=self.rule
            )


@dataclass(frozen=True)
class _HexFieldIn:
    """Base: the named 48-byte field must be one of ``values``."""

    values: frozenset[bytes]
    field_name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    rule: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", frozenset(self.values))
        if not self.values:
            raise ConfigError(f"{self.rule}: 'values' is empty: nothing could pass")
        if any(len(v) != 48 for v in self.values):
            raise ConfigError(f"{self.rule}: every value must be 48 bytes")

    def verify(self, claims: Claims) -> None:
        have = _field(claims, self.field_name, self.rule)
        if bytes.fromhex(have) not in self.values:
            raise PolicyError(
                f"{self.rule}: {self.label} {have} is not one of the "
                f"{len(self.values)} allowed value(s)",
                check=self.rule,
            )


@dataclass(frozen=True)
class MrConfigIdIn(_HexFieldIn):
    """MRCONFIGID (host-provided TD configuration id) must be one of ``values``."""

    field_name: ClassVar[str] = "mrconfigid"
    label: ClassVar[str] = "MRCONFIGID"
    rule: ClassVar[str] = "tdx.mrconfigid_in"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> MrConfigIdIn:
        """Build from ``{values = ["<96 hex>", ...]}``. Raises ConfigError."""
        _only_keys(table, ["values"], cls.rule)
        return cls(values=_hex_values(table, "values", cls.rule, 48))


@dataclass(frozen=True)
class MrOwnerIn(_HexFieldIn):
    """MROWNER (the TD owner's id) must be one of ``values``."""

    field_name: ClassVar[str] = "mrowner"
    label: ClassVar[str] = "MROWNER"
    rule: ClassVar[str] = "tdx.mrowner_in"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> MrOwnerIn:
        """Build from ``{values = ["<96 hex>", ...]}``. Raises ConfigError."""
        _only_keys(table, ["values"], cls.rule)
        return cls(values=_hex_values(table, "values", cls.rule, 48))


@dataclass(frozen=True)
class MrOwnerConfigIn(_HexFieldIn):
    """MROWNERCONFIG (owner-defined configuration) must be one of ``values``."""

    field_name: ClassVar[str] = "mrownerconfig"
    label: ClassVar[str] = "MROWNERCONFIG"
    rule: ClassVar[str] = "tdx.mrownerconfig_in"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> MrOwnerConfigIn:
        """Build from ``{values = ["<96 hex>", ...]}``. Raises ConfigError."""
        _only_keys(table, ["values"], cls.rule)
        return cls(values=_hex_values(table, "values", cls.rule, 48))


@dataclass(frozen=True)
class MrSeamIn(_HexFieldIn):
    """MRSEAM (measurement of the TDX module) must be one of ``values``."""

    field_name: ClassVar[str] = "mrseam"
    label: ClassVar[str] = "MRSEAM"
    rule: ClassVar[str] = "tdx.mrseam_in"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> MrSeamIn:
        """Build from ``{values = ["<96 hex>", ...]}``. Raises ConfigError."""
        _only_keys(table, ["values"], cls.rule)
        return cls(values=_hex_values(table, "values", cls.rule, 48))


@dataclass(frozen=True)
class _Masked8:
    """Base: ``(field & mask) == (value & mask)`` for an 8-byte field."""

    value: bytes
    mask: bytes = b"\xff" * 8
    field_name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    rule: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if len(self.value) != 8 or len(self.mask) != 8:
            raise ConfigError(f"{self.rule}: value and mask must be 8 bytes")

    @classmethod
    def _from_toml(cls, table: Mapping[str, Any]) -> tuple[bytes, bytes]:
        _only_keys(table, ["value", "mask"], cls.rule)
        if "value" not in table:
            raise ConfigError(f"{cls.rule}: 'value' is required")
        value = _hex_value(table["value"], "value", cls.rule, 8)
        mask = _hex_value(table.get("mask", "ff" * 8), "mask", cls.rule, 8)
        return value, mask

    def verify(self, claims: Claims) -> None:
        have = bytes.fromhex(_field(claims, self.field_name, self.rule))
        got = bytes(a & m for a, m in zip(have, self.mask, strict=True))
        want = bytes(a & m for a, m in zip(self.value, self.mask, strict=True))
        if got != want:
            raise PolicyError(
                f"{self.rule}: {self.label} {have.hex()} under mask {self.mask.hex()} is "
                f"{got.hex()}, expected {want.hex()}",
                check=self.rule,
            )


@dataclass(frozen=True)
class XfamEquals(_Masked8):
    """XFAM (extended CPU features the TD may use) must equal ``value`` under ``mask``."""

    field_name: ClassVar[str] = "xfam"
    label: ClassVar[str] = "XFAM"
    rule: ClassVar[str] = "tdx.xfam_equals"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> XfamEquals:
        """Build from ``{value = "<16 hex>", mask = "<16 hex>"}`` (mask optional)."""
        value, mask = cls._from_toml(table)
        return cls(value=value, mask=mask)


@dataclass(frozen=True)
class TdAttributesEqual(_Masked8):
    """TDATTRIBUTES must equal ``value`` under ``mask`` (e.g. require SEPT_VE_DISABLE,
    bit 28, or forbid PKS / KL). The DEBUG bit is better left to DebugDisallowed."""

    field_name: ClassVar[str] = "td_attributes"
    label: ClassVar[str] = "TDATTRIBUTES"
    rule: ClassVar[str] = "tdx.td_attributes_equal"

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> TdAttributesEqual:
        """Build from ``{value = "<16 hex>", mask = "<16 hex>"}`` (mask optional)."""
        value, mask = cls._from_toml(table)
        return cls(value=value, mask=mask)


@dataclass(frozen=True)
class MinimumTeeTcbSvn:
    """Each byte of TEE_TCB_SVN (the TDX module's and SEAM loader's SVNs, compared as
    Intel's TCB levels compare ``tdxtcbcomponents``) is at least the floor's byte.

    The floor works without collateral: the client's default policy carries one
    (``STARTER_MIN_TEE_TCB_SVN``) so that a quote reporting a TCB of all zeros never
    passes. Intel's verdict on the TCB level is ``tcb_status`` (needs collateral).
    """

    minimum: bytes
    rule: ClassVar[str] = "tdx.min_tee_tcb_svn"

    def __post_init__(self) -> None:
        if len(self.minimum) != 16:
            raise ConfigError(f"{self.rule}: the floor must be 16 bytes (32 hex digits)")
        if not any(self.minimum):
            raise ConfigError(f"{self.rule}: a floor of all zeros would pass every TCB")

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> MinimumTeeTcbSvn:
        """Build from ``{minimum = "<32 hex>"}``. Raises ConfigError."""
        _only_keys(table, ["minimum"], cls.rule)
        return cls(minimum=_hex_value(table.get("minimum"), "minimum", cls.rule, 16))

    def verify(self, claims: Claims) -> None:
        have = bytes.fromhex(_field(claims, "tee_tcb_svn", self.rule))
        low = [i for i, (a, m) in enumerate(zip(have, self.minimum, strict=True)) if a < m]
        if low:
            i = low[0]
            raise PolicyError(
                f"{self.rule}: TEE_TCB_SVN {have.hex()} is below the floor "
                f"{self.minimum.hex()} (byte {i}: {have[i]} < {self.minimum[i]})",
                check=self.rule,
            )


#: Rule name (the ``rule`` key of a policy-file table) -> its ``from_toml`` constructor.
TDX_RULES: Mapping[str, Any] = MappingProxyType(
    {
        cls.rule: cls.from_toml
        for cls in (
            TcbStatusIn,
            AdvisoryIdsNotIn,
            MrConfigIdIn,
            MrOwnerIn,
            MrOwnerConfigIn,
            MrSeamIn,
            XfamEquals,
            TdAttributesEqual,
            MinimumTeeTcbSvn,
        )
    }
)


def tdx_rule_from_toml(table: Mapping[str, Any]) -> Policy:
    """Build one TDX rule from a policy-file table ``{rule = "tdx.…", …}``.

    Raises ConfigError for an unknown rule name or bad parameters.
    """
    name = table.get("rule")
    if not isinstance(name, str) or name not in TDX_RULES:
        raise ConfigError(
            f"unknown TDX policy rule {name!r}; known: {', '.join(sorted(TDX_RULES))}"
        )
    built: Policy = TDX_RULES[name](table)
    return built
