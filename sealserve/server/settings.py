"""Server settings: one TOML file plus ``SEALSERVE_*`` environment overrides.

Over 400 lines: one field per setting, each carrying its config-reference text.

Validated once at start with clear errors, then frozen. Safe defaults: bind loopback,
TLS on (an in-memory key when no files are given), plaintext only through
``unsafe_plaintext``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sealserve.auth.settings import AuthSettings
from sealserve.defense.config import DefenseConfig, describe
from sealserve.defense.limits import LimitsConfig
from sealserve.errors import ConfigError, SealserveError, quote
from sealserve.server.model_keys import KeyBrokerSettings
from sealserve.validation import relative_paths, settings_from_file

T = TypeVar("T")

MAX_WORKERS = 256


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


def _table(value: Any, kind: type[T], parse: Callable[[Any], T], prefix: str = "") -> T | None:
    """A config table as ``kind``, parsed once when the settings are built (a
    ConfigError becomes the ValueError pydantic reports with the table's key)."""
    if value is None or isinstance(value, kind):
        return value
    try:
        return parse(value)
    except ConfigError as exc:
        raise ValueError(prefix + exc.message) from exc


def _auth_table(value: Any) -> AuthSettings | None:
    return _table(value, AuthSettings, AuthSettings.from_mapping, "[auth]: ")


def _defense_table(value: Any) -> DefenseConfig | None:
    return _table(value, DefenseConfig, DefenseConfig.parse)


def _workers(value: Any) -> int | str:
    """``workers``: an integer 1..256 or "auto" (TOML or the environment's string)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if value == "auto":
        return "auto"
    if type(value) is int and 1 <= value <= MAX_WORKERS:
        return value
    shown = quote(str(value)) if isinstance(value, str) else repr(value)
    raise ValueError(f'workers must be an integer from 1 to {MAX_WORKERS} or "auto", not {shown}')


def _limits_table(value: Any, info: ValidationInfo) -> LimitsConfig | None:
    # A defended server (models in [defense], validated before this field) counts rows
    # and caps them by default.
    defense = info.data.get("defense")
    defended = bool(defense and defense.models)
    return _table(value, LimitsConfig, lambda v: LimitsConfig.from_mapping(v, defended=defended))


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
    workers: Annotated[int | str, PlainValidator(_workers)] = Field(
        default="auto",
        description=(
            "Serving processes on the one port (SO_REUSEPORT), forked after the TLS key "
            'and attested identity exist: 1..256, or "auto" = the cores this process '
            "may use (CPU affinity and cgroup CPU limit) when the state_store is shared "
            "(sqlite:, redis:), one process with memory: (per-process quotas). Each "
            "worker holds its own copy of the models. docs/operator-guide.md#workers."
        ),
    )
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
    auth: Annotated[AuthSettings | None, PlainValidator(_auth_table)] = Field(
        default=None,
        description=(
            "Bearer-token verification ([auth] table; keys as in docs/auth.md: audience, "
            "required_tos_version, [[auth.issuers]] with jwks_file or jwks_url, ...)."
        ),
    )
    attestation_platform: Literal["auto", "configfs-tsm", "azure-vtpm", "simulated", "none"] = (
        Field(
            default="auto",
            description=(
                "Where attestation evidence comes from: 'configfs-tsm' (a real SEV-SNP or "
                "TDX guest), 'azure-vtpm' (an Azure SEV-SNP confidential VM: HCL report and "
                "vTPM quote, needs tpm2-tools), 'simulated' (needs simulated_platform_dir), "
                "'none' (no GetEvidence), or 'auto' (configfs-tsm if present, else simulated "
                "if a directory is set, else none)."
            ),
        )
    )
    azure_vtpm_tcti: str | None = Field(
        default=None,
        description=(
            "azure-vtpm: the TPM tpm2-tools talks to (TPM2TOOLS_TCTI; default "
            "'device:/dev/tpmrm0')."
        ),
    )
    azure_vcek_chain: Path | None = Field(
        default=None,
        description=(
            "azure-vtpm: a PEM file with the VM's VCEK, ASK and ARK (default: fetched once "
            "at start from Azure's instance metadata, THIM)."
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
    # Before limits: whether models are defended changes the limits' defaults.
    defense: Annotated[DefenseConfig | None, PlainValidator(_defense_table)] = Field(
        default=None,
        description=(
            "Output defenses per model: perturbation profiles, watermark, extraction "
            "detection, graduated responses, audit log ([defense]; docs/defenses.md)."
        ),
    )
    limits: Annotated[LimitsConfig | None, PlainValidator(_limits_table)] = Field(
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
        if self.workers not in (1, "auto") and self.state_store.startswith("memory:"):
            raise ValueError(
                "workers > 1 needs a state store the workers share (quotas and statuses "
                "would be per process): set state_store to sqlite://PATH or redis://..."
            )
        return self

    def worker_count(self) -> int:
        """``workers`` as a number ("auto": the CPUs this process may run on, or 1 with
        the per-process memory: store, which workers could not share)."""
        if self.workers == "auto":
            if self.state_store.startswith("memory:"):
                return 1
            return usable_cpus()
        return int(self.workers)

    def where(self, key: str) -> str:
        """``FILE: key`` (or just ``key`` without a config file), for messages."""
        return f"{self._source}: {key}" if self._source is not None else key

    def problem(self, key: str, exc: SealserveError, *, fix: str | None = None) -> ConfigError:
        """A startup problem as one :class:`ConfigError` naming the file and the key."""
        return ConfigError(f"{self.where(key)}: {exc.message}", remedy=fix or exc.remedy)

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
        settings = settings_from_file(cls, path, overrides, what="settings")
        if path is not None:
            settings = settings._relative_to(path.resolve().parent)
            settings._source = path
        elif settings.defense is not None:  # its paths made absolute, as from a file
            cwd = Path.cwd()
            settings = settings.model_copy(update={"defense": settings.defense.relative_to(cwd)})
        return settings

    def _relative_to(self, base: Path) -> Settings:
        # Relative paths in a config file are relative to that file.
        update: dict[str, Any] = relative_paths(
            self, base, "model_repository", "tls_cert_file", "tls_key_file",
            "simulated_platform_dir",
        )  # fmt: skip
        kb = self.key_broker
        if kb is not None:
            update["key_broker"] = kb.model_copy(update=relative_paths(kb, base, "ca_file"))
        if self.state_store.startswith("sqlite://"):
            path = Path(self.state_store.removeprefix("sqlite://"))
            if not path.is_absolute():
                update["state_store"] = f"sqlite://{base / path}"
        if self.defense is not None:
            update["defense"] = self.defense.relative_to(base)
        if self.auth is not None:
            update["auth"] = self.auth.relative_to(base)
        return self.model_copy(update=update) if update else self

    def measured(self) -> dict[str, Any]:
        """The settings that decide how the workload behaves, for the workload manifest.

        No secrets, and no deployment plumbing (addresses, ports, file paths, logging), so
        that an auditor reproduces the same manifest from the same config on any machine.
        """
        auth = self.auth
        return {
            "server_name": self.server_name,
            "tls": "plaintext" if self.unsafe_plaintext else (
                "files" if self.tls_cert_file else "ephemeral"),
            "auth": auth.describe() if auth is not None else "disabled",
            "max_request_bytes": self.max_request_bytes,
            "engine": self.engine.model_dump(mode="json"),
            "attestation_platform": self.attestation_platform,
            "limits": self.limits.table if self.limits is not None else None,
            "state_store": self.state_store.split(":", 1)[0],
            "unsafe_fail_open": self.unsafe_fail_open,
            "key_broker": self.key_broker is not None,
            "defense": describe(self.defense) if self.defense is not None else None,
            "rest": self.rest is not None,
        }  # fmt: skip


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset), lowered
    to its cgroup's CPU quota (a Kubernetes CPU limit: cgroup v2 ``cpu.max``, or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; 1..MAX_WORKERS."""
    count = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        count = min(count, max(1, -(-quota[0] // quota[1])))
    return max(1, min(count, MAX_WORKERS))


def _cgroup_quota(root: Path) -> tuple[int, int] | None:
    """``(quota, period)`` in microseconds, or None without a CPU limit."""
    try:  # cgroup v2
        fields = (root / "cpu.max").read_text().split()
        limited = len(fields) == 2 and fields[0] != "max"
        return (int(fields[0]), int(fields[1])) if limited else None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return (quota, period) if quota > 0 and period > 0 else None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
