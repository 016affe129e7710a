"""One way to say what is wrong with a configuration that pydantic refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is a server-side dependency; this module only reads errors
    from pydantic import ValidationError

__all__ = ["describe_validation_error"]


def describe_validation_error(exc: ValidationError, *, root: str = "(settings)") -> str:
    """``loc: message`` for every error, joined by ``; `` (``root`` names an error of
    the whole table)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or root
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
