"""The model repository on disk: ``<repo>/<model>/<version>/model.onnx``.

Each model directory may hold a ``config.toml`` (see :class:`ModelConfig`). Model bytes
are read through a :class:`ModelSource`, so that encrypted models plug in without the
engine knowing: the engine only ever sees bytes in memory.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sealserve.errors import ConfigError
from sealserve.server.model_keys import EncryptedModelSource, KeyProvider
from sealserve.validation import describe_validation_error

log = logging.getLogger("sealserve.repository")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_FILENAME = "model.onnx"
SEALED_FILENAME = "model.sealed"


class ModelSource(Protocol):
    """Where a model version's bytes come from. One method: return the ONNX bytes
    (an encrypted source takes its key from ``keys``)."""

    def read(self, keys: KeyProvider) -> bytes: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FileModelSource:
    """A plaintext ONNX file."""

    path: Path

    def read(self, keys: KeyProvider) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read model file {self.path}: {exc.strerror}") from exc

    def describe(self) -> str:
        return f"file:{self.path}"


class BatchingConfig(BaseModel):
    """Dynamic batching for one model.

    ``max_batch_size = 0`` disables batching. ``execution`` chooses where
    ``InferenceSession.run`` happens: ``"thread"`` (a worker thread; the event loop
    stays free), ``"inline"`` (on the event loop: cheapest for models that run in
    microseconds) or ``"auto"`` (inline when a warm-up run takes under
    ``inline_threshold_us``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=0, ge=0, le=65536)
    max_queue_delay_us: int = Field(default=500, ge=0, le=1_000_000)
    max_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    execution: Literal["auto", "thread", "inline"] = "auto"
    inline_threshold_us: int = Field(default=200, ge=0)


class EncryptionConfig(BaseModel):
    """Where an encrypted model's key comes from when no key broker releases it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_file: Path | None = Field(
        default=None, description="Owner-held key file (development); relative to the model dir."
    )


class ModelConfig(BaseModel):
    """Per-model settings, from ``<repo>/<model>/config.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encryption: EncryptionConfig = EncryptionConfig()
    version_policy: Literal["latest", "all", "specific"] = "latest"
    versions: tuple[int, ...] = ()
    batching: BatchingConfig = BatchingConfig()
    intra_op_threads: int | None = Field(default=None, ge=1, le=256)

    @field_validator("versions")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(x < 1 for x in v):
            raise ValueError("versions are positive integers")
        return v


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    source: ModelSource
    config: ModelConfig


def _load_model_config(path: Path) -> ModelConfig:
    if not path.is_file():
        return ModelConfig()
    try:
        data = tomllib.loads(path.read_text())
        cfg = ModelConfig.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, root='(root)')}") from exc
    if cfg.version_policy == "specific" and not cfg.versions:
        raise ConfigError(f"{path}: version_policy 'specific' needs a non-empty 'versions' list")
    return cfg


def scan_repository(root: Path) -> list[ModelEntry]:
    """List the model versions to serve under ``root``, applying version policies.

    A version directory holds ``model.onnx`` (plaintext) or ``model.sealed``
    (encrypted; its key is fetched when it is read). Raises :class:`ConfigError` when the
    repository is missing, holds no model, or a model's config is invalid.
    """
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    entries: list[ModelEntry] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = model_dir.name
        if name.startswith("."):
            continue
        if not _NAME.match(name):
            raise ConfigError(f"model directory name {name!r} is not a valid model name")
        cfg = _load_model_config(model_dir / "config.toml")
        versions = sorted(
            int(p.name)
            for p in model_dir.iterdir()
            if p.is_dir()
            and p.name.isdigit()
            and int(p.name) > 0
            and ((p / MODEL_FILENAME).is_file() or (p / SEALED_FILENAME).is_file())
        )
        if not versions:
            log.warning("model %s has no version directory with %s; skipped", name, MODEL_FILENAME)
            continue
        if cfg.version_policy == "latest":
            chosen = versions[-1:]
        elif cfg.version_policy == "all":
            chosen = versions
        else:
            missing = sorted(set(cfg.versions) - set(versions))
            if missing:
                raise ConfigError(f"model {name}: configured versions {missing} are not on disk")
            chosen = sorted(cfg.versions)
        key_file = cfg.encryption.key_file
        if key_file is not None and not key_file.is_absolute():
            key_file = model_dir / key_file
        for v in chosen:
            vdir = model_dir / str(v)
            src: ModelSource
            if (vdir / SEALED_FILENAME).is_file():
                src = EncryptedModelSource(vdir / SEALED_FILENAME, key_file)
            else:
                src = FileModelSource(vdir / MODEL_FILENAME)
            entries.append(ModelEntry(name=name, version=str(v), source=src, config=cfg))
    if not entries:
        raise ConfigError(f"model repository {root} holds no model (<model>/<version>/model.onnx)")
    return entries
