"""Every command run without its extra prints one hint line and exits 2, before doing
anything; the commands of the base install run with every extra missing.

A missing module is simulated in a subprocess: a meta-path finder placed first refuses
the blocked names, as an install without them would (nothing else is changed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sealserve.cli._extras import NEEDS, Need
from sealserve.cli.main import build_parser, subcommands

ROOT = Path(__file__).resolve().parents[2]

RUN_BLOCKED = """
import sys
blocked = set(sys.argv[1].split(","))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from sealserve.cli.main import main
sys.exit(main(sys.argv[2:]))
"""

# The import name of every distribution the extras bring (tested against pyproject).
IMPORT_NAMES = {
    "onnxruntime": "onnxruntime",
    "scipy": "scipy",
    "redis": "redis",
    "hiredis": "hiredis",
    "prometheus-client": "prometheus_client",
    "pydantic": "pydantic",
    "pydantic-settings": "pydantic_settings",
    "grpcio-health-checking": "grpc_health",
    "grpcio-reflection": "grpc_reflection",
    "tqdm": "tqdm",
    "dcap-qvl": "dcap_qvl",
    "uvicorn": "uvicorn",
    "httptools": "httptools",
    "orjson": "orjson",
    "scikit-learn": "sklearn",
    "matplotlib": "matplotlib",
}
EXTRA_MODULES = frozenset(IMPORT_NAMES.values())
# Imported inside try/except ImportError by the command itself (the demo skips its thief).
OPTIONAL = {("demo", "sklearn")}

# One invocation per table row, argv that parses (nothing is read: the check comes first).
NEEDING = {
    "serve": ["serve", "--config", "sealserve.toml"],
    "demo": ["demo"],
    "measure": ["measure", "--launch", "simulated"],
    "broker serve": ["broker", "serve", "--config", "broker.toml"],
    "encrypt": ["encrypt", "m.onnx", "--key-id", "k", "--out", "m.sealed"],
    "health": ["health", "--target", "127.0.0.1:1"],
    "stress": [
        "stress",
        "--target",
        "127.0.0.1:1",
        "--config",
        "s.toml",
        "--issuer-key",
        "k.pem",
        "--issuer",
        "i",
        "--tier",
        "t",
    ],
    "watermark verify": ["watermark", "verify", "--ledger", "l", "--suspect", "s.onnx"],
    "replica-check": [
        "replica-check",
        "--original",
        "o.onnx",
        "--ledger",
        "l",
        "--suspect",
        "s.onnx",
    ],
    "redteam": ["redteam", "--target", "127.0.0.1:1"],
    "audit report --html": ["audit", "report", "log", "--html", "r.html"],
    "audit report --png": ["audit", "report", "log", "--png", "r.png"],
}
# Commands (or actions) of the base install: they must get past the check with every
# extra missing, and fail, if at all, on their own terms.
BASE = {  # label: (argv, exit status: 0 done, 1 its own error at run time)
    "token keygen": (["token", "keygen", "--out-dir", "{tmp}/keys"], 0),
    "platform init-simulated": (["platform", "init-simulated", "{tmp}/platform"], 0),
    "verify": (["verify", "--evidence", "{tmp}/missing.bin"], 1),
    "admin": (
        ["admin", "--target", "127.0.0.1:1", "--token-file", "{tmp}/t", "account", "alice"],
        1,
    ),
    "broker list": (
        ["broker", "list", "--broker", "127.0.0.1:1", "--admin-token-file", "{tmp}/t"],
        1,
    ),
    "audit report": (["audit", "report", "{tmp}/missing.log"], 1),
    "audit verify": (["audit", "verify", "{tmp}/missing.log", "--public-key", "00" * 32], 1),
}


def _run(
    blocked: frozenset[str] | set[str], argv: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_BLOCKED, ",".join(sorted(blocked)), *argv],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _parse(label: str) -> argparse.Namespace:
    return build_parser().parse_args(NEEDING[label])


def _need(label: str) -> Need:
    args = _parse(label)
    (need,) = [n for n in NEEDS if n.applies(args)]
    assert need.label(args) == "sealserve " + label
    return need


@pytest.mark.parametrize("label", sorted(NEEDING))
def test_a_command_without_its_extra_says_which_in_one_line_and_exits_2(
    label: str, tmp_path: Path
) -> None:
    need = _need(label)
    for module in need.modules:
        out = _run({module}, NEEDING[label], tmp_path)
        extra = need.extra
        assert (out.returncode, out.stdout) == (2, ""), out.stderr
        assert out.stderr == (
            f"error: 'sealserve {label}' needs the {extra} extra ({module} is not "
            f"installed): pip install 'sealserve[{extra}]'\n"
        )
    assert list(tmp_path.iterdir()) == []  # nothing was done


@pytest.mark.parametrize("label", sorted(BASE))
def test_base_install_commands_need_no_extra(label: str, tmp_path: Path) -> None:
    (tmp_path / "t").write_text("not-a-token")
    argv, status = BASE[label]
    out = _run(EXTRA_MODULES, [a.replace("{tmp}", str(tmp_path)) for a in argv], tmp_path)
    assert out.returncode == status, out.stderr
    assert "needs the" not in out.stderr
    assert "Traceback" not in out.stderr and "ModuleNotFoundError" not in out.stderr, out.stderr


def test_every_command_is_covered() -> None:
    covered = {label.split()[0].replace("-", "_") for label in (*NEEDING, *BASE)}
    assert covered == set(subcommands())
    exercised = {id(n) for k in NEEDING for n in NEEDS if n.applies(_parse(k))}
    assert exercised == {id(n) for n in NEEDS}


def test_the_table_knows_every_extra_module_a_command_imports() -> None:
    """From the import graph (function-level imports included): a command module that
    can reach a module of an extra has a row naming it."""
    import grimp

    graph = grimp.build_graph(
        "sealserve", include_external_packages=True, exclude_type_checking_imports=True
    )
    for name in subcommands():
        module, command = f"sealserve.cli.{name}", name.replace("_", "-")
        reached = {m.split(".")[0] for m in graph.find_upstream_modules(module)}
        listed = {m for n in NEEDS if n.command == command for m in n.modules}
        unlisted = (reached & EXTRA_MODULES) - listed - {m for c, m in OPTIONAL if c == command}
        assert not unlisted, f"{command} imports {sorted(unlisted)}: add them to NEEDS"


def test_import_names_cover_the_extras_of_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {
        re.split(r"[<>=\[ ;]", req, maxsplit=1)[0]
        for extra in ("server", "redteam")
        for req in extras[extra]
        if not req.startswith("sealserve")
    }
    assert names == set(IMPORT_NAMES)
    for need in NEEDS:
        assert set(need.modules) <= EXTRA_MODULES
        assert need.extra in extras
