"""``sealserve measure --launch``: SEV-SNP launch measurements equal the known answers
of sev-snp-measure's own tests (fixtures and values from virtee/sev-snp-measure at
8f2b337e, Apache-2.0; see tests/data/launch/sev-snp-measure/README.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sealserve.attestation.launch import SnpLaunch, reference_policy, snp_launch_measurement
from sealserve.attestation.policy import policy_from_toml
from sealserve.broker.completeness import policy_gaps
from sealserve.errors import ConfigError
from tests.conftest import sealserve_cmd, sealserve_env

DATA = Path(__file__).resolve().parent.parent / "data" / "launch" / "sev-snp-measure"
AMDSEV = DATA / "ovmf_AmdSev_suffix.bin"
OVMFX64 = DATA / "ovmf_OvmfX64_suffix.bin"
NULL = Path("/dev/null")

# (vcpus, kernel?, append, guest features, vmm) -> MEASUREMENT, from tests/test_guest.py.
KNOWN = [
    (1, True, "console=ttyS0 loglevel=7", 0x21, "qemu",
     "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    (1, True, "console=ttyS0 loglevel=7", 0x1, "qemu",
     "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
    (1, False, None, 0x21, "qemu",
     "e1e1ca029dd7973ab9513295be68198472dcd4fc834bd9af9b63f6e8a1674dbf281a9278a4a2ebe0eed9f22adbcd0e2b"),
    (4, True, "", 0x21, "qemu",
     "4953b1fb416fa874980e8442b3706d345926d5f38879134e00813c5d7abcbe78eafe7b422907be0b4698e2414a631942"),
    (1, True, "", 0x21, "ec2",
     "0ce9ccc06bab55eebe8abc234f3df6514883977a68a591b71052498ab52b2f1aa415db338033946ef93aa8278c0d67fb"),
]  # fmt: skip


@pytest.mark.parametrize(("vcpus", "kernel", "append", "features", "vmm", "expected"), KNOWN)
def test_snp_launch_measurement_equals_the_known_answers(
    vcpus: int, kernel: bool, append: str | None, features: int, vmm: str, expected: str
) -> None:
    spec = SnpLaunch(
        ovmf=AMDSEV,
        kernel=NULL if kernel else None,
        initrd=NULL if kernel else None,
        append=append,
        vcpus=vcpus,
        guest_features=features,
        vmm=vmm,
    )
    assert snp_launch_measurement(spec).hex() == expected


def test_a_changed_part_changes_the_measurement() -> None:
    base = SnpLaunch(ovmf=AMDSEV, kernel=NULL, initrd=NULL, append="ro", guest_features=0x21)
    other = SnpLaunch(ovmf=AMDSEV, kernel=NULL, initrd=NULL, append="rw", guest_features=0x21)
    assert snp_launch_measurement(base) != snp_launch_measurement(other)


def test_bad_launch_parts_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="doesn't include SNP_KERNEL_HASHES"):
        snp_launch_measurement(SnpLaunch(ovmf=OVMFX64, kernel=NULL, initrd=NULL, append=""))
    with pytest.raises(ConfigError, match="unknown vCPU type 'EPYC-v99'"):
        snp_launch_measurement(SnpLaunch(ovmf=AMDSEV, vcpu_type="EPYC-v99"))
    with pytest.raises(ConfigError, match="ovmf file '/nonexistent' does not exist"):
        SnpLaunch(ovmf=Path("/nonexistent"))
    with pytest.raises(ConfigError, match="need --kernel"):
        SnpLaunch(ovmf=AMDSEV, append="x")
    with pytest.raises(ConfigError, match="vcpus must be 1..512"):
        SnpLaunch(ovmf=AMDSEV, vcpus=0)


def test_reference_policy_is_complete_and_loads() -> None:
    m = bytes.fromhex(KNOWN[0][-1])  # type: ignore[arg-type]
    text = reference_policy(platform="sev-snp", measurement=m, manifest_digest=b"\x01" * 32)
    policy_from_toml(text)
    assert policy_gaps(text, ["amd"]) == []
    assert "min_tcb = { bl = 3, snp = 8 }" in text
    with pytest.raises(ConfigError, match="expected 48 bytes, got 3"):
        reference_policy(platform="sev-snp", measurement=b"abc")


def test_measure_launch_cli_prints_and_writes_the_policy(tmp_path: Path) -> None:
    out = tmp_path / "policy.toml"
    argv = sealserve_cmd("measure", "--launch", "sev-snp", "--ovmf", str(AMDSEV), "--kernel",
                         "/dev/null", "--initrd", "/dev/null", "--append",
                         "console=ttyS0 loglevel=7", "--guest-features", "0x21",
                         "--min-tcb", "bl=4,snp=22,ucode=217", "--policy-out", str(out))  # fmt: skip
    r = subprocess.run(argv, env=sealserve_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert KNOWN[0][-1] in r.stdout  # type: ignore[operator]
    text = out.read_text()
    assert f'measurement = ["{KNOWN[0][-1]}"]' in text
    assert (
        "min_tcb = { bl = 4, snp = 22, ucode = 217 }" in text and 'platforms = ["sev-snp"]' in text
    )
    tdx = subprocess.run(sealserve_cmd("measure", "--launch", "tdx"), env=sealserve_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tdx.returncode == 1 and "needs --ovmf" in tdx.stderr
