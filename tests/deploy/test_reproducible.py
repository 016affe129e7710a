"""Reproducible measurement: one commit, built twice, gives one code digest.

The code digest (``sealserve.enclave.manifest.code_digest``) goes into the workload
manifest that clients and auditors pin, so two builds of one commit must agree, and
any change of a file must show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sealserve.enclave.manifest import code_digest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EPOCH = "1767225600"  # any fixed time; deploy/build.sh uses the commit's time


def _checkout(dest: Path, *, mtime: float | None = None) -> Path:
    """A copy of the files a build reads (what a fresh clone of the commit holds)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "sealserve", dest / "sealserve", ignore=shutil.ignore_patterns("__pycache__")
    )
    if mtime is not None:  # a clone made at another time
        for p in dest.rglob("*"):
            os.utime(p, (mtime, mtime))
    return dest


def _build_and_install(src: Path, out: Path) -> tuple[Path, Path]:
    """Build the wheel of ``src`` into out/wheel, install it into out/site; return both."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(out / "wheel"), str(src)],
        env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (out / "wheel").glob("sealserve-*.whl")
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-compile", "--target", str(out / "site"),
         str(wheel)],
        env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return wheel, out / "site" / "sealserve"


def test_two_builds_of_one_commit_measure_the_same(tmp_path: Path) -> None:
    a = _checkout(tmp_path / "clone-a")
    b = _checkout(tmp_path / "clone-b", mtime=2_000_000_000)
    wheel_a, pkg_a = _build_and_install(a, tmp_path / "out-a")
    wheel_b, pkg_b = _build_and_install(b, tmp_path / "out-b")
    assert code_digest(pkg_a) == code_digest(pkg_b)
    # The same as the source tree: an auditor can measure from a checkout of the commit.
    assert code_digest(pkg_a) == code_digest(ROOT / "sealserve")
    # With SOURCE_DATE_EPOCH the wheels themselves are the same bytes.
    assert wheel_a.read_bytes() == wheel_b.read_bytes()

    # One changed byte in one file changes the digest.
    changed = _checkout(tmp_path / "clone-c")
    errors = changed / "sealserve" / "errors.py"
    errors.write_text(errors.read_text() + "\n")
    _, pkg_c = _build_and_install(changed, tmp_path / "out-c")
    assert code_digest(pkg_c) != code_digest(pkg_a)
    # ... and so does a file added to the package.
    (pkg_a / "demo" / "extra.json").write_text("{}")
    assert code_digest(pkg_a) != code_digest(pkg_b)


def test_byte_code_caches_do_not_count(tmp_path: Path) -> None:
    pkg = _checkout(tmp_path / "clone") / "sealserve"
    before = code_digest(pkg)
    import compileall

    assert compileall.compile_dir(pkg, quiet=1)
    assert list(pkg.rglob("__pycache__/*.pyc"))
    assert code_digest(pkg) == before
