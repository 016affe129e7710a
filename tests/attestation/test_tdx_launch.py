"""``sealserve measure --launch tdx``: MRTD of a genuine distribution OVMF equals the
values two independent upstream implementations give (tests/data/launch/tdx/SOURCES.md),
RTMR2 follows the EFI stub's event log, and the written policy is one that
``broker set-policy`` accepts."""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import random
import secrets
import subprocess
from pathlib import Path

import pytest

from sealserve.attestation.launch import reference_policy
from sealserve.attestation.policy import policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tdx_launch import (
    TdxLaunch,
    tdvf_sections,
    tdx_launch_registers,
    tdx_mrtd,
    tdx_rtmr2,
)
from sealserve.broker.completeness import policy_gaps
from sealserve.broker.core import KeyBroker
from sealserve.broker.nonces import NonceBook
from sealserve.broker.store import KeyStore
from sealserve.errors import ConfigError
from tests.conftest import sealserve_cmd, sealserve_env

DATA = Path(__file__).resolve().parent.parent / "data" / "launch"
OVMF_XZ = DATA / "tdx" / "ovmf-debian-2022.11-6+deb12u2.fd.xz"
OVMF_SHA256 = "7b456907dd0786d415999e801a1ac4637b8ed4d7cf5378cfc6edbe5e574dd773"
# td-shim's td_shim_tee_info_hash.py (per page) and quex's reproduceMrtd (per section).
MRTD_PER_PAGE = (
    "4c7206f0f483c524f12c366c711e9049030a8d47c471ee5aa9c4999a08de4057"
    "fb887fed0744d5631a212967fb231c47"
)
MRTD_PER_SECTION = (
    "acccbcc870a381adab0d3919d90a7f268ac3b0364771f202ed4bb4e892d045b3"
    "3db3b32e6924cba830a724eed443f7e1"
)


@pytest.fixture(scope="module")
def ovmf() -> bytes:
    data = lzma.decompress(OVMF_XZ.read_bytes())
    assert hashlib.sha256(data).hexdigest() == OVMF_SHA256
    return data


@pytest.fixture
def ovmf_file(ovmf: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "OVMF.fd"
    path.write_bytes(ovmf)
    return path


def test_mrtd_equals_the_upstream_tools_for_both_page_orders(ovmf: bytes) -> None:
    assert tdx_mrtd(ovmf).hex() == MRTD_PER_PAGE
    assert tdx_mrtd(ovmf, page_order="per-section").hex() == MRTD_PER_SECTION


def test_the_tdvf_metadata_is_read_as_the_design_guide_lays_it_out(ovmf: bytes) -> None:
    sections = tdvf_sections(ovmf)
    assert [(s.kind_name, s.extend_mr) for s in sections] == [
        ("BFV", True), ("CFV", False), ("TempMem", False), ("TempMem", False),
        ("TD_HOB", False), ("TempMem", False),
    ]  # fmt: skip
    bfv = sections[0]
    assert (bfv.address, bfv.memory_size, bfv.data_offset) == (0xFFE20000, 0x1E0000, 0x20000)


def test_only_measured_bytes_change_mrtd(ovmf: bytes) -> None:
    bfv, cfv = tdvf_sections(ovmf)[:2]
    code = bytearray(ovmf)
    code[bfv.data_offset + 0x1234] ^= 1  # firmware code: MR.EXTENDed
    assert tdx_mrtd(bytes(code)).hex() != MRTD_PER_PAGE
    variables = bytearray(ovmf)
    variables[cfv.data_offset + 0x1234] ^= 1  # variable store: added, not extended
    assert tdx_mrtd(bytes(variables)).hex() == MRTD_PER_PAGE


def test_firmware_without_tdvf_metadata_is_refused_with_the_reason(ovmf: bytes) -> None:
    with pytest.raises(ConfigError, match="no OVMF table footer"):
        tdx_mrtd(bytes(0x10000))
    with pytest.raises(ConfigError, match="is not an OVMF/TDVF image"):
        tdx_mrtd(b"short")
    # The last 4 KiB of an OVMF build: metadata whose firmware volume is not there.
    with pytest.raises(ConfigError, match="section 0 \\(BFV\\) lies outside the image"):
        tdx_mrtd((DATA / "sev-snp-measure" / "ovmf_OvmfX64_suffix.bin").read_bytes())
    bad = bytearray(ovmf)
    meta = len(ovmf) - 0x840  # the TDVF descriptor of this image
    bad[meta + 8] = 2  # version
    with pytest.raises(ConfigError, match="bad TDVF descriptor"):
        tdx_mrtd(bytes(bad))
    bad = bytearray(ovmf)
    bad[meta + 16 + 8] = 0x10  # the BFV's guest address, no longer page-aligned
    with pytest.raises(ConfigError, match="section 0 \\(BFV\\) is not 4 KiB aligned"):
        tdx_mrtd(bytes(bad))
    with pytest.raises(ConfigError, match="page order"):
        tdx_mrtd(ovmf, page_order="sideways")


def test_corrupt_metadata_gets_a_clear_error_never_a_crash_or_a_hang(ovmf: bytes) -> None:
    meta = len(ovmf) - 0x840
    bad = bytearray(ovmf)
    bad[meta + 16 + 64 + 16 : meta + 16 + 64 + 24] = (1 << 62).to_bytes(8, "little")  # TempMem
    with pytest.raises(ConfigError, match="not a firmware image"):
        tdx_mrtd(bytes(bad))
    rng = random.Random(15)
    region = range(meta - 64, len(ovmf))  # the metadata and the OVMF table after it
    for _ in range(300):
        bad = bytearray(ovmf)
        for _ in range(rng.randint(1, 4)):
            bad[rng.choice(region)] = rng.randrange(256)
        with contextlib.suppress(ConfigError):  # anything else fails the test
            tdvf_sections(bytes(bad))


# quex's reproduceRtmr, run on these inputs (tests/data/launch/tdx/SOURCES.md).
RTMR2_QUEX = (
    "b48b0fdeeeec1ead9a00d12adb9c0b667f957a59f361a65a783e657f583f4639"
    "69e2eb8f7ce98f1bc51b701570e6c7c7"
)


def test_rtmr2_equals_the_upstream_tool() -> None:
    initrd = bytes((7 * i) % 256 for i in range(5000))
    assert tdx_rtmr2(cmdline="console=hvc0 root=/dev/vda ro", initrd=initrd).hex() == RTMR2_QUEX


def test_rtmr2_replays_the_efi_stub_events() -> None:
    initrd = b"\x07" * 1000
    # The event log the Linux EFI stub writes (PCR 9 -> RTMR2), spelled out: the load
    # options OVMF builds (command line + " initrd=initrd", UTF-16LE, NUL-terminated),
    # then the initrd bytes.
    options = "console=hvc0 root=/dev/vda".encode("utf-16-le") + " initrd=initrd\0".encode(
        "utf-16-le"
    )
    rtmr = bytes(48)
    for event in (options, initrd):
        rtmr = hashlib.sha384(rtmr + hashlib.sha384(event).digest()).digest()
    assert tdx_rtmr2(cmdline="console=hvc0 root=/dev/vda", initrd=initrd) == rtmr
    without = hashlib.sha384(
        bytes(48) + hashlib.sha384("ro\0".encode("utf-16-le")).digest()
    ).digest()
    assert tdx_rtmr2(cmdline="ro", initrd=None) == without
    with pytest.raises(ConfigError, match="non-empty kernel command line"):
        tdx_rtmr2(cmdline="", initrd=initrd)


def test_launch_spec_checks_its_parts(ovmf_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need --kernel"):
        TdxLaunch(ovmf=ovmf_file, append="ro")
    with pytest.raises(ConfigError, match="kernel file '/nonexistent' does not exist"):
        TdxLaunch(ovmf=ovmf_file, kernel=Path("/nonexistent"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    regs = tdx_launch_registers(TdxLaunch(ovmf=ovmf_file, kernel=kernel, append="ro"))
    assert set(regs) == {"mrtd", "rtmr2"} and regs["mrtd"].hex() == MRTD_PER_PAGE
    assert set(tdx_launch_registers(TdxLaunch(ovmf=ovmf_file))) == {"mrtd"}


def test_a_tdx_reference_policy_needs_every_launch_register() -> None:
    regs = {"mrtd": b"\x01" * 48, "rtmr2": b"\x02" * 48}
    with pytest.raises(ConfigError, match="missing rtmr0, rtmr1"):
        reference_policy(platform="tdx", registers=regs)
    regs |= {"rtmr0": b"\x03" * 48, "rtmr1": b"\x04" * 48}
    text = reference_policy(platform="tdx", registers=regs, manifest_digest=b"\x05" * 32)
    policy_from_toml(text)
    assert policy_gaps(text, ["intel"]) == []
    assert 'min_tee_tcb_svn = "03000200000000000000000000000000"' in text


def test_measure_launch_tdx_cli_writes_a_policy_set_policy_accepts(
    ovmf_file: Path, tmp_path: Path
) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"\x07" * 1000)
    out = tmp_path / "policy.toml"
    base = ("measure", "--launch", "tdx", "--ovmf", str(ovmf_file), "--kernel", str(kernel),
            "--initrd", str(initrd), "--append", "console=hvc0 root=/dev/vda")  # fmt: skip
    r = subprocess.run(sealserve_cmd(*base, "--policy-out", str(out)), env=sealserve_env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "missing rtmr0, rtmr1" in r.stderr
    assert MRTD_PER_PAGE in r.stdout and not out.exists()
    args = (*base, "--rtmr0", "ab" * 48, "--rtmr1", "cd" * 48, "--policy-out", str(out))
    r = subprocess.run(sealserve_cmd(*args), env=sealserve_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    rtmr2 = tdx_rtmr2(cmdline="console=hvc0 root=/dev/vda", initrd=initrd.read_bytes()).hex()
    assert f'mrtd = ["{MRTD_PER_PAGE}"]' in text and f'rtmr2 = ["{rtmr2}"]' in text
    assert policy_gaps(text, ["intel"]) == []
    broker = KeyBroker(
        KeyStore.open(tmp_path / "keys.sealed", master_key=secrets.token_bytes(32)),
        nonces=NonceBook(ttl=60),
        roots={"intel": TrustedRoots.intel_sgx()},
    )
    broker.add_key("k", None, policy_toml=text, roots=("intel",))  # what set-policy checks
    broker.set_policy("k", policy_toml=text)
    bad = subprocess.run(sealserve_cmd(*base, "--rtmr0", "ab" * 47), env=sealserve_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "expected 48 bytes (96 hex), got 47" in bad.stderr
