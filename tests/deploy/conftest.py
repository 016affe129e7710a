"""Shared by the deploy tests: the operator guide's blocks and one install per session.

The install is the guide's own install block (deploy/build.sh, the Dockerfile's build
logic), run once into a temporary prefix; test_build_script.py checks what it made and
test_operator_guide.py runs the rest of the guide with it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operator-guide.md"
# Tags of ```bash blocks in the guide: run by the tests, or not runnable here (and why).
RUN_TAGS = ("guide-install", "guide", "guide-serve", "guide-broker")
NOT_RUN_TAGS = ("on-hardware", "on-cluster", "coming")
# Placeholders the guide uses, replaced with temporary ones.
GUIDE_PREFIX, GUIDE_WORKDIR, GUIDE_PORT = "/opt/sealserve", "/srv/sealserve", "8001"
GUIDE_BROKER_PORT = "8002"


def guide_blocks() -> list[tuple[str | None, str]]:
    """(tag, text) of every ```bash block of the guide, in order."""
    fence = re.compile(r"^```bash(?:[ \t]+([\w-]+))?[ \t]*\n(.*?)^```", flags=re.M | re.S)
    return [(m.group(1), m.group(2)) for m in fence.finditer(GUIDE.read_text())]


def image_env() -> dict[str, str]:
    """The environment of the image: no PYTHONPATH into this tree, no byte-code writes."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHON"] = sys.executable  # the interpreter deploy/build.sh makes the venv from
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Installed:
    prefix: Path
    workdir: Path
    port: int
    log: str
    broker_port: int = 0

    @property
    def wheels(self) -> Path:
        return self.workdir / "dist"

    @property
    def site(self) -> Path:
        (site,) = (self.prefix / "lib").glob("python3*/site-packages")
        return site

    def substitute(self, text: str) -> str:
        return (
            text.replace(GUIDE_PREFIX, str(self.prefix))
            .replace(GUIDE_WORKDIR, str(self.workdir))
            .replace(GUIDE_PORT, str(self.port))
            .replace(GUIDE_BROKER_PORT, str(self.broker_port))
        )


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The guide's install block, run once (1-2 min with a cold pip cache)."""
    tmp = tmp_path_factory.mktemp("guide")
    inst = Installed(tmp / "opt-sealserve", tmp / "srv-sealserve", free_port(), "")
    inst.workdir.mkdir()
    (install,) = [text for tag, text in guide_blocks() if tag == "guide-install"]
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", inst.substitute(install)],
        cwd=ROOT, env=image_env(), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Installed(inst.prefix, inst.workdir, inst.port, out.stdout, free_port())
