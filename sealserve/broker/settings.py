"""Broker settings: one TOML file plus ``SEALSERVE_BROKER_*`` environment overrides.

Validated once at start, then frozen. Safe defaults: bind loopback, TLS always (from
files, or an in-memory certificate whose public half can be written out for clients
to pin), the simulated root only when configured and labelled unsafe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sealserve.auth.settings import AuthSettings, IssuerSettings
from sealserve.broker.store import load_master_key
from sealserve.errors import ConfigError
from sealserve.validation import relative_paths, settings_from_file

ADMIN_AUDIENCE = "sealserve-broker"
ADMIN_TOS = "broker-admin"


class AdminSettings(BaseModel):
    """Who may call the admin RPCs: JWTs from ``issuer`` (keys in ``jwks_file``) with
    audience ``audience``, scope ``admin`` and terms version ``required_tos_version``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(description="The admin token issuer (the token's 'iss').")
    jwks_file: Path = Field(description="JWKS file with the issuer's public keys.")
    audience: str = Field(default=ADMIN_AUDIENCE, description="Required 'aud' of admin tokens.")
    required_tos_version: str = Field(
        default=ADMIN_TOS, description="Required 'sealserve_tos' claim of admin tokens."
    )

    def auth_settings(self) -> AuthSettings:
        """As :class:`AuthSettings` (admin tokens need no tier claim). Raises ConfigError."""
        return AuthSettings(
            issuers=(IssuerSettings(self.issuer, jwks_file=self.jwks_file),),
            audience=self.audience,
            required_tos_version=self.required_tos_version,
            default_tier="admin",
            cache_max_entries=0,
        )


def _check_pccs_url(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError(f"tdx_pccs_url {url[:60]!r}: use https (plain http only on loopback)")


class BrokerSettings(BaseSettings):
    """Everything ``sealserve broker serve`` needs. Field docs are the config reference."""

    model_config = SettingsConfigDict(
        env_prefix="SEALSERVE_BROKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(default=8002, ge=0, le=65535, description="gRPC port (0 = pick one).")
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain; with tls_key_file, TLS from files."
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key for TLS.")
    tls_hostnames: tuple[str, ...] = Field(
        default=("localhost", "127.0.0.1"),
        description="Names in the in-memory certificate (when no TLS files are given).",
    )
    tls_ephemeral_cert_out: Path | None = Field(
        default=None,
        description="Write the in-memory certificate (public PEM) here for clients to pin.",
    )
    store_file: Path = Field(description="The sealed key store (created on first write).")
    master_key_file: Path | None = Field(
        default=None, description="File holding the 32-byte master key (64 hex digits)."
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="The master key as 64 hex digits; set through SEALSERVE_BROKER_MASTER_KEY.",
    )
    admin: AdminSettings = Field(description="Admin token verification ([admin] table).")
    unsafe_simulated_root_dir: Path | None = Field(
        default=None,
        description=(
            "UNSAFE, development only: also offer the simulated platform root in this "
            "directory, for keys whose roots include 'unsafe-simulated'."
        ),
    )
    tdx_collateral_dir: Path | None = Field(
        default=None,
        description=(
            "Intel TDX collateral cache: '<fmspc hex>.json' files in dcap-qvl's collateral "
            "JSON form (what a PCCS serves, with its signatures). Used when a TD's evidence "
            "carries no collateral; TDX evidence with neither is refused."
        ),
    )
    tdx_pccs_url: str | None = Field(
        default=None,
        description=(
            "Intel PCCS (or PCS) base URL: fetch TDX collateral here when a TD sent none "
            "and tdx_collateral_dir holds none for its FMSPC (https, or http on loopback)."
        ),
    )
    tdx_pccs_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Deadline of one PCCS fetch."
    )
    tdx_pccs_cache_seconds: float = Field(
        default=3600.0, ge=0, description="How long fetched collateral is reused per FMSPC."
    )
    nonce_ttl_seconds: float = Field(
        default=60.0, gt=0, le=600, description="How long a challenge nonce stays valid."
    )
    max_outstanding_nonces: int = Field(
        default=10_000, ge=1, description="Unredeemed challenges held at most."
    )
    log_format: Literal["json", "text"] = Field(default="json", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _check(self) -> BrokerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_cert_file is not None and self.tls_ephemeral_cert_out is not None:
            raise ValueError("tls_ephemeral_cert_out applies only without TLS files")
        if (self.master_key_file is None) == (self.master_key is None):
            raise ValueError("give exactly one of master_key_file and SEALSERVE_BROKER_MASTER_KEY")
        if self.tdx_pccs_url is not None:
            _check_pccs_url(self.tdx_pccs_url)
        try:
            self.admin.auth_settings()
        except ConfigError as exc:
            raise ValueError(f"[admin]: {exc.message}") from exc
        return self

    def read_master_key(self) -> bytes:
        """The 32-byte master key. Raises ConfigError if unreadable or malformed."""
        if self.master_key is not None:
            return load_master_key(self.master_key.get_secret_value().encode())
        assert self.master_key_file is not None
        try:
            data = self.master_key_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"master key: cannot read {self.master_key_file}: {exc}") from exc
        return load_master_key(data)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> BrokerSettings:
        """Build settings from ``path`` (TOML), the environment and ``overrides``;
        relative paths in the file are relative to the file. Raises ConfigError."""
        settings = settings_from_file(cls, path, overrides, what="broker settings")
        if path is not None:
            settings = settings._relative_to(path.resolve().parent)
        return settings

    def _relative_to(self, base: Path) -> BrokerSettings:
        update: dict[str, Any] = relative_paths(
            self, base, "tls_cert_file", "tls_key_file", "tls_ephemeral_cert_out", "store_file",
            "master_key_file", "unsafe_simulated_root_dir", "tdx_collateral_dir",
        )  # fmt: skip
        update["admin"] = self.admin.model_copy(
            update=relative_paths(self.admin, base, "jwks_file")
        )
        return self.model_copy(update=update) if update else self
