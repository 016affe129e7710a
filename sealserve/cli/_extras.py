"""Which install extra each command needs, checked once, before the command runs.

The base install (``pip install sealserve``) is the client SDK and the verifier; the
server, the broker and the owner's tools need ``sealserve[server]``, the extraction
attacks and the report plots ``sealserve[redteam]`` (pyproject.toml's extras). One
table says, per command (and, where it matters, per action or option), which extra
provides it and which of that extra's modules the command imports; :func:`missing`
looks them up with :func:`importlib.util.find_spec` (nothing is imported) and words the
one line the CLI prints instead of a ``ModuleNotFoundError`` traceback.
tests/cli/test_extras.py holds the table to the import graph of each command module.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass

# What `sealserve serve` (and the demo, which runs it) imports from [server].
_SERVE = (
    "onnxruntime",
    "scipy",
    "pydantic",
    "pydantic_settings",
    "grpc_health",
    "grpc_reflection",
    "prometheus_client",
    "redis",
    "uvicorn",
    "orjson",
)
_SETTINGS = ("pydantic", "pydantic_settings")
_WATERMARK = ("onnxruntime", "scipy", *_SETTINGS)


@dataclass(frozen=True)
class Need:
    """``command`` needs ``extra``'s ``modules`` (only for the action ``when`` names,
    argparse dest -> value, and only when one of the options ``with_any`` is given)."""

    command: str
    extra: str
    modules: tuple[str, ...]
    when: tuple[tuple[str, str], ...] = ()
    with_any: tuple[str, ...] = ()

    def applies(self, args: argparse.Namespace) -> bool:
        if getattr(args, "command", None) != self.command:
            return False
        if any(getattr(args, dest, None) != value for dest, value in self.when):
            return False
        return not self.with_any or any(getattr(args, o, None) for o in self.with_any)

    def label(self, args: argparse.Namespace) -> str:
        words = ["sealserve", self.command, *(value for _, value in self.when)]
        words += [f"--{o.replace('_', '-')}" for o in self.with_any if getattr(args, o, None)]
        return " ".join(words)


NEEDS: tuple[Need, ...] = (
    Need("serve", "server", _SERVE),
    Need("demo", "server", (*_SERVE, "dcap_qvl")),
    Need("measure", "server", _SETTINGS),
    Need("broker", "server", ("dcap_qvl", *_SETTINGS), when=(("broker_command", "serve"),)),
    Need("encrypt", "server", ("tqdm",)),
    Need("health", "server", ("grpc_health",)),
    Need("stress", "server", _SETTINGS),
    Need("watermark", "server", _WATERMARK, when=(("watermark_action", "verify"),)),
    Need("replica-check", "server", _WATERMARK),
    Need("redteam", "redteam", ("sklearn", "matplotlib", "onnxruntime", "scipy")),
    Need(
        "audit",
        "redteam",
        ("matplotlib",),
        when=(("audit_command", "report"),),
        with_any=("html", "png"),
    ),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(args: argparse.Namespace) -> str | None:
    """The one line to print when the command ``args`` names lacks its extra, else None."""
    for need in NEEDS:
        if not need.applies(args):
            continue
        absent = [m for m in need.modules if not _installed(m)]
        if absent:
            return (
                f"'{need.label(args)}' needs the {need.extra} extra ({absent[0]} is not "
                f"installed): pip install 'sealserve[{need.extra}]'"
            )
    return None
