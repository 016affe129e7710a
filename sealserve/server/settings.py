"""Server settings: one TOML file plus ``SEALSERVE_*`` environment overrides.

Validated once at start with clear errors, then frozen. Safe defaults: bind loopback,
TLS on (an in-memory key when no files are given), plaintext only through
``unsafe_plaintext``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sealserve.auth.settings import AuthSettings, IssuerSettings
from sealserve.defense.config import DefenseConfig, describe
from sealserve.defense.limits import LimitsConfig
from sealserve.errors import ConfigError, SealserveError, quote
from sealserve.server.model_keys import KeyBrokerSettings
from sealserve.validation import describe_validation_error


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: int = Field(
        default=1, ge=1, le=256, description="onnxruntime threads per session run."
    )


class RestSettings(BaseModel):
    """The OIP REST port ([rest]; docs/rest.md): same data plane, auth and TLS identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=8000, ge=0, le=65535, description="REST port (0 = pick one).")
    host: str = Field(default="127.0.0.1", description="Address the REST port binds.")
    max_json_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description=(
            "Largest JSON part of a request (a JSON number costs ~30 bytes once parsed); "
            "larger tensors go in the binary data extension."
        ),
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Time a client has to send its request headers."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time a client has to send a request body."
    )
    keep_alive_s: int = Field(default=5, ge=1, le=300, description="Idle keep-alive timeout.")
    max_connections: int = Field(
        default=1000, ge=1, description="Open connections beyond this get 503."
    )


class Settings(BaseSettings):
    """Everything ``sealserve serve`` needs. Field docs are the config reference."""

    model_config = SettingsConfigDict(
        env_prefix="SEALSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(default=8001, ge=0, le=65535, description="gRPC port (0 = pick one).")
    model_repository: Path = Field(
        default=Path("models"), description="Directory holding <model>/<version>/model.onnx."
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain; with tls_key_file, TLS from files."
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key for TLS.")
    unsafe_plaintext: bool = Field(
        default=False,
        description="Serve without TLS. Only for local experiments; logged loudly.",
    )
    unsafe_plaintext_public: bool = Field(
        default=False,
        description=(
            "Allow unsafe_plaintext on a non-loopback host (tokens and data in clear text "
            "on the network). Refused without it."
        ),
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description=(
            "A second, plaintext port serving only grpc.health.v1 (no data, no tokens), "
            "for probes that cannot speak TLS (Kubernetes' native gRPC probe)."
        ),
    )
    health_host: str = Field(default="127.0.0.1", description="Address of health_port.")
    metrics_host: str = Field(default="127.0.0.1", description="Address for /metrics.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus port; unset = no metrics server."
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description=(
            "Largest total tensor payload one request may carry. Above it: "
            "INVALID_ARGUMENT 'request tensors exceed the size limit of N bytes' (up to "
            "twice the cap; gRPC refuses larger messages with RESOURCE_EXHAUSTED)."
        ),
    )
    log_format: Literal["json", "text"] = Field(default="json", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineSettings = EngineSettings()
    server_name: str = Field(default="sealserve", description="Name in ServerMetadata.")
    auth: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Bearer-token verification ([auth] table; keys as in docs/auth.md: audience, "
            "required_tos_version, [[auth.issuers]] with jwks_file or jwks_url, ...)."
        ),
    )
    attestation_platform: Literal["auto", "configfs-tsm", "simulated", "none"] = Field(
        default="auto",
        description=(
            "Where attestation evidence comes from: 'configfs-tsm' (a real SEV-SNP or TDX "
            "guest), 'simulated' (needs simulated_platform_dir), 'none' (no GetEvidence), "
            "or 'auto' (configfs-tsm if present, else simulated if a directory is set, "
            "else none)."
        ),
    )
    simulated_platform_dir: Path | None = Field(
        default=None,
        description="Directory made by `sealserve platform init-simulated` (dev and tests).",
    )
    state_store: str = Field(
        default="sqlite://sealserve-state.db",
        description=(
            "Where quota, account status and detector state live: 'sqlite://PATH' (the "
            "embedded default; a relative PATH is relative to the config file, "
            "'sqlite:///abs/path' is absolute), 'redis://HOST:PORT/DB' for "
            "several replicas, 'redis+cluster://HOST:PORT' (any node of a Redis "
            "Cluster), or 'memory:' (one process, tests)."
        ),
    )
    state_store_prefix: str = Field(default="sealserve", description="Key prefix in Redis.")
    state_store_deadline_s: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description=(
            "Longest a request's admission waits for the state store; past it the request "
            "is refused (UNAVAILABLE) while health, metadata and evidence keep answering."
        ),
    )
    unsafe_fail_open: bool = Field(
        default=False,
        description="Admit requests unchecked when the state store is down (logged loudly).",
    )
    limits: dict[str, Any] | None = Field(
        default=None,
        description="Rate limits and quotas per tier, peer and model ([limits]; docs/quotas.md).",
    )
    key_broker: KeyBrokerSettings | None = Field(
        default=None, description="Key broker for encrypted models ([key_broker] table)."
    )
    harden_process: bool = Field(
        default=True,
        description=(
            "At start: no core dumps, not dumpable, memory locked where permitted (each "
            "step's outcome is recorded in the workload manifest)."
        ),
    )
    defense: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Output defenses per model: perturbation profiles, watermark, extraction "
            "detection, graduated responses, audit log ([defense]; docs/defenses.md)."
        ),
    )
    unsafe_disable_auth: bool = Field(
        default=False,
        description="Serve without authentication. Local experiments only; logged loudly.",
    )
    unsafe_allow_python_hooks: bool = Field(
        default=False,
        description="Start on a real platform although PYTHONPATH, LD_PRELOAD, a "
        "sitecustomize/usercustomize module or an executing .pth file is present (the "
        "attested manifest then says so). Never in production.",
    )
    public_liveness: bool = Field(
        default=True,
        description=(
            "OIP ServerLive and ServerReady answer without a token, like health "
            "(OIP clients probe them without one); false: they need the metadata scope."
        ),
    )
    evidence_per_peer_per_minute: int = Field(
        default=60,
        ge=1,
        le=100_000,
        description="GetEvidence calls one client address may make per minute (public RPC).",
    )

    rest: RestSettings | None = Field(
        default=None,
        description=(
            "The Open Inference Protocol over HTTP on a second port ([rest] table: port, "
            "host, max_json_bytes, header_timeout_s, body_timeout_s, keep_alive_s, "
            "max_connections; docs/rest.md). Unset = gRPC only."
        ),
    )

    # The config file these settings came from (None: arguments and environment only).
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.unsafe_plaintext and self.tls_cert_file is not None:
            raise ValueError("unsafe_plaintext and tls_cert_file are mutually exclusive")
        if self.unsafe_plaintext and not self.unsafe_plaintext_public and not _loopback(self.host):
            raise ValueError(
                f"host {quote(self.host)} is not a loopback address and unsafe_plaintext "
                "is set: tokens and data would cross the network in clear text. Configure "
                "TLS, bind 127.0.0.1, or set unsafe_plaintext_public = true"
            )
        if self.auth is None and not self.unsafe_disable_auth:
            raise ValueError(
                "authentication is required: configure [auth] (see docs/auth.md), or set "
                "unsafe_disable_auth = true for a local experiment"
            )
        if self.attestation_platform == "simulated" and self.simulated_platform_dir is None:
            raise ValueError("attestation_platform 'simulated' needs simulated_platform_dir")
        if self.auth is not None and self.unsafe_disable_auth:
            raise ValueError("[auth] and unsafe_disable_auth are mutually exclusive")
        if self.auth is not None:
            try:
                self.auth_settings()
            except ConfigError as exc:
                raise ValueError(f"[auth]: {exc.message}") from exc
        if self.limits is not None:
            try:
                self.limits_config()
            except ConfigError as exc:
                raise ValueError(exc.message) from exc
        if self.defense is not None:
            try:
                self.defense_config()
            except ConfigError as exc:
                raise ValueError(exc.message) from exc
        return self

    def defense_config(self) -> DefenseConfig | None:
        """The [defense] table validated (paths already made absolute by ``load``)."""
        if self.defense is None:
            return None
        return DefenseConfig.parse(self.defense, base=Path.cwd())

    def limits_config(self) -> LimitsConfig | None:
        """The [limits] table validated; raises ConfigError naming the key."""
        if self.limits is None:
            return None
        # A defended server counts rows and caps them by default (issue 16).
        defended = bool(self.defense and self.defense.get("models"))
        return LimitsConfig.from_mapping(self.limits, defended=defended)

    def where(self, key: str) -> str:
        """``FILE: key`` (or just ``key`` without a config file), for messages."""
        return f"{self._source}: {key}" if self._source is not None else key

    def problem(self, key: str, exc: SealserveError, *, fix: str | None = None) -> ConfigError:
        """A startup problem as one :class:`ConfigError` naming the file and the key."""
        return ConfigError(f"{self.where(key)}: {exc.message}", remedy=fix or exc.remedy)

    def auth_settings(self) -> AuthSettings | None:
        """The [auth] table as :class:`AuthSettings`; raises ConfigError if invalid."""
        if self.auth is None:
            return None
        data = dict(self.auth)
        issuers = data.pop("issuers", [])
        if not isinstance(issuers, list) or not all(isinstance(i, dict) for i in issuers):
            raise ConfigError("auth.issuers must be a list of tables ([[auth.issuers]])")
        _known_keys("auth", data, AuthSettings)
        for n, issuer in enumerate(issuers):
            _known_keys(f"auth.issuers[{n}]", issuer, IssuerSettings)
        try:
            built = tuple(
                IssuerSettings(
                    **{**i, "jwks_file": Path(i["jwks_file"]) if "jwks_file" in i else None}
                )
                for i in issuers
            )
            if "revocation_file" in data:
                data["revocation_file"] = Path(data["revocation_file"])
            for key in ("algorithms",):
                if key in data:
                    data[key] = tuple(data[key])
            if data.get("allowed_tiers") is not None:
                data["allowed_tiers"] = frozenset(data["allowed_tiers"])
            return AuthSettings(issuers=built, **data)
        except TypeError as exc:
            raise ConfigError(f"unknown or missing auth setting: {exc}") from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the TOML file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from ``path`` (TOML), the environment and ``overrides``.

        Raises :class:`ConfigError` naming the file and every invalid field.
        """
        target: type[Settings] = cls
        if path is not None:
            if not path.is_file():
                raise ConfigError(
                    f"config file {path} does not exist",
                    remedy="Pass the path of an existing TOML file to --config.",
                )
            try:
                tomllib.loads(path.read_text())
            except OSError as exc:
                raise ConfigError(
                    f"{path}: cannot read the config file: {exc.strerror}",
                    remedy="Make the file readable by the user the server runs as.",
                ) from exc
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
            target = type(
                "Settings", (cls,), {"model_config": {**cls.model_config, "toml_file": path}}
            )
        try:
            settings = target(**overrides)
        except ValidationError as exc:
            where = f"{path}: " if path else ""
            raise ConfigError(where + format_validation_error(exc)) from exc
        if path is not None:
            settings = settings._relative_to(path.resolve().parent)
            settings._source = path
        return settings

    def _relative_to(self, base: Path) -> Settings:
        # Relative paths in a config file are relative to that file.
        update: dict[str, Any] = {}
        if not self.model_repository.is_absolute():
            update["model_repository"] = base / self.model_repository
        for key in ("tls_cert_file", "tls_key_file", "simulated_platform_dir"):
            value = getattr(self, key)
            if value is not None and not value.is_absolute():
                update[key] = base / value
        kb = self.key_broker
        if kb is not None and kb.ca_file is not None and not kb.ca_file.is_absolute():
            update["key_broker"] = kb.model_copy(update={"ca_file": base / kb.ca_file})
        if self.state_store.startswith("sqlite://"):
            path = Path(self.state_store.removeprefix("sqlite://"))
            if not path.is_absolute():
                update["state_store"] = f"sqlite://{base / path}"
        if self.defense is not None:
            update["defense"] = _absolute_defense_paths(self.defense, base)
        if self.auth is not None:
            auth = dict(self.auth)
            if "revocation_file" in auth and not Path(auth["revocation_file"]).is_absolute():
                auth["revocation_file"] = str(base / auth["revocation_file"])
            issuers = []
            for i in auth.get("issuers", []):
                i = dict(i) if isinstance(i, dict) else i
                if (
                    isinstance(i, dict)
                    and "jwks_file" in i
                    and not Path(i["jwks_file"]).is_absolute()
                ):
                    i["jwks_file"] = str(base / i["jwks_file"])
                issuers.append(i)
            if "issuers" in auth:
                auth["issuers"] = issuers
            update["auth"] = auth
        return self.model_copy(update=update) if update else self

    def measured(self) -> dict[str, Any]:
        """The settings that decide how the workload behaves, for the workload manifest.

        No secrets, and no deployment plumbing (addresses, ports, file paths, logging), so
        that an auditor reproduces the same manifest from the same config on any machine.
        """
        auth = self.auth_settings()
        return {
            "server_name": self.server_name,
            "tls": "plaintext" if self.unsafe_plaintext else (
                "files" if self.tls_cert_file else "ephemeral"),
            "auth": auth.describe() if auth is not None else "disabled",
            "max_request_bytes": self.max_request_bytes,
            "engine": self.engine.model_dump(mode="json"),
            "attestation_platform": self.attestation_platform,
            "limits": self.limits,
            "state_store": self.state_store.split(":", 1)[0],
            "unsafe_fail_open": self.unsafe_fail_open,
            "key_broker": self.key_broker is not None,
            "defense": _describe_defense(self.defense_config()),
            "rest": self.rest is not None,
        }  # fmt: skip


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _known_keys(table: str, data: dict[str, Any], cls: type[Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{table}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})",
            remedy=f"Remove or correct the key; docs/auth.md lists the [{table}] keys.",
        )


def _absolute_defense_paths(defense: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(defense)

    def fix(value: Any) -> Any:
        return (
            str(base / value) if isinstance(value, str) and not Path(value).is_absolute() else value
        )

    if "state_dir" in out:
        out["state_dir"] = fix(out["state_dir"])
    if isinstance(out.get("audit"), dict) and "dir" in out["audit"]:
        out["audit"] = {**out["audit"], "dir": fix(out["audit"]["dir"])}
    elif "audit" not in out or isinstance(out.get("audit"), dict):
        out["audit"] = {**(out.get("audit") or {}), "dir": str(base / "audit")}
    if isinstance(out.get("models"), dict):
        out["models"] = {
            k: (
                {**v, "reference": fix(v["reference"])}
                if isinstance(v, dict) and "reference" in v
                else v
            )
            for k, v in out["models"].items()
        }
    return out


def _describe_defense(cfg: DefenseConfig | None) -> Any:
    return None if cfg is None else describe(cfg)


def format_validation_error(exc: ValidationError) -> str:
    return "invalid settings: " + describe_validation_error(exc)
