"""Install roles: the client SDK and the verifier never pull in server-only deps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("module", ["sealserve.client", "sealserve.attestation"])
def test_light_modules_do_not_import_onnxruntime(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('onnxruntime', 'scipy') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"
