"""One way to say what is wrong with a configuration: a settings file that cannot be
read, and what pydantic refused in it (server and broker alike)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sealserve.errors import ConfigError

if TYPE_CHECKING:  # pydantic is a server-side dependency, imported where it is used
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

__all__ = ["describe_validation_error", "relative_paths", "settings_from_file"]

S = TypeVar("S", bound="BaseSettings")


def describe_validation_error(exc: ValidationError, *, root: str = "(settings)") -> str:
    """``loc: message`` for every error, joined by ``; `` (``root`` names an error of
    the whole table)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or root
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def settings_from_file(
    cls: type[S], path: Path | None, overrides: dict[str, Any], *, what: str
) -> S:
    """``cls`` built from ``overrides``, the environment and the TOML file ``path`` (in
    that precedence; ``cls`` reads its ``toml_file``). Paths are left as written.

    Raises ConfigError naming the file: missing, unreadable, not TOML, or every invalid
    field (``invalid {what}: key: problem; ...``).
    """
    from pydantic import ValidationError

    target = cls
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
        config = {**cls.model_config, "toml_file": path}
        target = type(cls.__name__, (cls,), {"model_config": config})
    try:
        return target(**overrides)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}invalid {what}: {describe_validation_error(exc)}") from exc


def relative_paths(model: Any, base: Path, *keys: str) -> dict[str, Path]:
    """``{key: base / path}`` for each of ``keys`` whose path on ``model`` is relative
    (a model_copy update: paths in a config file are relative to the file)."""
    update = {}
    for key in keys:
        value = getattr(model, key)
        if value is not None and not value.is_absolute():
            update[key] = base / value
    return update
