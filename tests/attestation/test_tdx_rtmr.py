"""TDX RTMR0 and RTMR1 of a QEMU direct boot: each event against values OVMF computed in
real TDs (oasisprotocol/cli's test vectors), the whole registers against quex's
independent implementation, and the Authenticode digest against LIEF
(tests/data/launch/tdx/SOURCES.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import struct
from pathlib import Path

import lief
import pytest

from sealserve.attestation import tdx_rtmr as t
from sealserve.attestation.tdx_launch import rtmr_replay, tdvf_sections
from sealserve.errors import ConfigError
from tests.attestation._kernel import synthetic_bzimage

TDX = Path(__file__).resolve().parent.parent / "data" / "launch" / "tdx"
MIB = 1 << 20
CMDLINE = "console=hvc0 root=/dev/vda ro"

# OVMF-computed TD HOB digests by memory size (MiB): oasisprotocol/cli
# build/measurement/tdx_qemu_test.go, TestMeasureTdxQemuTdHob.
HOB = {
    512: "00934f9ff0a0f65e41109afb9a7c5a0719f567f32514aeaef4c23c8535793f7064a2c69738a2000500ffae6ba349a153",
    640: "62f2fe0fb274f5e0530e5cefd0e547321f19e5989a73711853ddd9e4b3feb1474d6ed46ba4f3a362d01096643665a537",
    1024: "1055c9b9a1fc534e688560e2304e18c8597b7261818cf61fb163d40c130547309b750575947a4dcaedbdce4b8d0535f2",
    2048: "0b8772e5b0b41b83e6044a68397e02f49fb47066b4fbe4917ea2c45c64f323fdacbb37948f821ebaf8bc9c938ba8a749",
    2064: "149c7f16b4a8fd0f45c908eec2cb8bb55b557a0bb7265f5e90055649599511a5d7219b59f8b1c2eca42eb861de19b160",
    2560: "e05c12e2a65d57b3ff1f70abd2ae689c7e9096558dc28122befbcecad4a9d6d4569652e5c0298ee381bee5febeecbaa6",
    2624: "190cd2f908ac59d9ca2236d69e5e2d8c0b58648229d970331c53c329239f592efa6d437716b6e96f3467bb234c83f37a",
    2688: "7386292d589c0cada5ed97b0738e3606eb7fa9920e588d75b68118ec7e4ec7538dd3f6cdf531368d03f0713064b45197",
    2815: "51d4fd91da99cc87d6826bd6177fe8c74790b01b6a315d7ca2639d9d1df9e7835a2251b8e69ecef132b6b0302040f25e",
    2816: "8eb1a02074362aa0761541cdb4dc3f1788dfeb4538803b241477848e26de294dbe917ab56c5628732679b3abc168c2de",
    3072: "798f84285da30f6c295fbb73e3c093cf13164b6ad9d547a123b8d4d305f87a027caaba88e4cfd684ed7b424f37811a2e",
    4096: "5b684faf8d02a733945f821d9cdd170802e72103977acf66949c9382500283adc90cbec57f8e7653f8bee1cab83689de",
    5120: "757f23ac59db87c10d7d01cd92792f9dde979862da0b750ff22e2b61a1cd7e3456f55a41d3e3bcb52ee2007e59b8b0a1",
    8192: "2e070cda358b5aa00f27cca25c47381bb564f4be3a84d059805a73cbbde764ed8341f7e09915b5e7b370f9c08a743fbd",
    16384: "cd2312a0d87ef3c4a928df87088969a80b33d7bf3fc584bdde637b09ed808a8d821a56b78a13a6eb506db7578444abbe",
}
# TestMeasureLog's third vector: a whole RTMR0 as OVMF extended it (2815 MiB, 1 vCPU).
OASIS_RTMR0_LOG = [
    "51d4fd91da99cc87d6826bd6177fe8c74790b01b6a315d7ca2639d9d1df9e7835a2251b8e69ecef132b6b0302040f25e",
    "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6412af21c097d473155875ffd561d6790",
    "9dc3a1f80bcec915391dcda5ffbb15e7419f77eab462bbf72b42166fb70d50325e37b36f93537a863769bcf9bedae6fb",
    "6f2e3cbc14f9def86980f5f66fd85e99d63e69a73014ed8a5633ce56eca5b64b692108c56110e22acadcef58c3250f1b",
    "d607c0efb41c0d757d69bca0615c3a9ac0b1db06c557d992e906c6b7dee40e0e031640c7bfd7bcd35844ef9edeadc6f9",
    "08a74f8963b337acb6c93682f934496373679dd26af1089cb4eaf0c30cf260a12e814856385ab8843e56a9acea19e127",
    "18cc6e01f0c6ea99aa23f8a280423e94ad81d96d0aeb5180504fc0f7a40cb3619dd39bd6a95ec1680a86ed6ab0f9828d",
    "394341b7182cd227c5c6b07ef8000cdfd86136c4292b8e576573ad7ed9ae41019f5818b4b971c9effc60e1ad9f1289f0",
    "68cd79315e70aecd4afe7c1b23a5ed7b3b8e51a477e1739f111b3156def86bbc56ebf239dcd4591bc7a9fff90023f481",
    "6bc203b3843388cc4918459c3f5c6d1300a796fb594781b7ecfaa3ae7456975f095bfcc1156c9f2d25e8b8bc1b520f66",
    "a7ced2dba0b7c273b8f6ea58dfaebf0663cd4dff2fe821e4a5019fa1bc96f02d5616b4fd5c473cbce1651f88b640146f",
    "1dd6f7b457ad880d840d41c961283bab688e94e4b59359ea45686581e90feccea3c624b1226113f824f315eb60ae0a7c",
    "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28eacf7047ae6e967c58fd2a98bfa74c298",
    "394341b7182cd227c5c6b07ef8000cdfd86136c4292b8e576573ad7ed9ae41019f5818b4b971c9effc60e1ad9f1289f0",
]
OASIS_RTMR0 = "84efb9756c002ee0aff43b0fa71223bdad6b43b3aa112c93c5bf89f3466e69f35b2d4acef407c8a0a692a20eff9a5177"
# TestMeasureTdxQemuAcpiTables, 1 vCPU: tables (512 / 2815 MiB), RSDP, loader.
ACPI_TABLES = {
    512: "41693a04e4aa7122b8fdab1ff9a84da6c7652143e3a2a1f4215847b9144d1d524498da73378c6222f7f67fd2f3a3fd16",
    2815: "a7ced2dba0b7c273b8f6ea58dfaebf0663cd4dff2fe821e4a5019fa1bc96f02d5616b4fd5c473cbce1651f88b640146f",
}
# quex's reproduceRtmr on Debian's OVMF, the ACPI blob above, synthetic_bzimage() (or
# synthetic_bzimage(xloadflags=0): "fixed"), the 5000-byte initrd and CMDLINE.
QUEX = [
    (2048, "default", True,
     "385bb3e662df7333fcbfb3379082d3abdf6a353d2329c5f635deddc6432103f8ff9fe16ddad290b718d5ea7093093f6f",
     "3863ec27459b2756f6fefda68128b6f73397a22d66b4593e1edcda62f62c1b41e65d463ce9e117736b228f6c1507f95a"),
    (2048, "default", False,
     "385bb3e662df7333fcbfb3379082d3abdf6a353d2329c5f635deddc6432103f8ff9fe16ddad290b718d5ea7093093f6f",
     "1ffefa7cfbf083a1132c95a12af4c1238a5a13f802b7eebea1e46313af91299ec8c0d545980823bc55428a03bc08fdb3"),
    (4096, "default", True,
     "94309d181d21d46d763f708b9b4a0cf2f36304d3229efff645ccee08fc7106d206421a6c693cb7ad5c21c626eeb335c5",
     "3863ec27459b2756f6fefda68128b6f73397a22d66b4593e1edcda62f62c1b41e65d463ce9e117736b228f6c1507f95a"),
    (2048, "fixed", True,
     "385bb3e662df7333fcbfb3379082d3abdf6a353d2329c5f635deddc6432103f8ff9fe16ddad290b718d5ea7093093f6f",
     "9d53eb6dbfcfe64d828b4a8d93c52888b802c93185a969533a457deda270adcf28b64b8c005b1712ff580f6a8bed2a9f"),
    (1024, "fixed", True,
     "c88c896322c1663156acfb646e6fc758637a27d8f7b35f93629a5f365c4bc7e79836f9a2fa967a6b21cf001390b8db0e",
     "cf99582be4b415f38f48f942b7144c8950ae3b5145cc624381091ebdc1d550792d91014688ffb374be87c4613dbe7cac"),
]  # fmt: skip


@pytest.fixture(scope="module")
def ovmf() -> bytes:
    return lzma.decompress((TDX / "ovmf-debian-2022.11-6+deb12u2.fd.xz").read_bytes())


@pytest.fixture(scope="module")
def acpi() -> bytes:
    """QEMU's etc/acpi/tables for a 1-vCPU, 2815 MiB TD (oasisprotocol/cli's template)."""
    return lzma.decompress((TDX / "qemu-acpi-tables-cpu1.bin.xz").read_bytes())


def _sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


@pytest.mark.parametrize("mib", sorted(HOB))
def test_td_hob_is_what_ovmf_measured(ovmf: bytes, mib: int) -> None:
    assert _sha384(t.td_hob(tdvf_sections(ovmf), mib * MIB)) == HOB[mib]


def test_acpi_loader_rsdp_and_tables_are_what_ovmf_measured(acpi: bytes) -> None:
    tables = t.acpi_tables(acpi)
    assert [s for s, _, _ in tables] == [
        b"FACS",
        b"DSDT",
        b"FACP",
        b"APIC",
        b"MCFG",
        b"WAET",
        b"RSDT",
    ]
    assert _sha384(t.acpi_loader(tables)) == OASIS_RTMR0_LOG[8]
    assert _sha384(t.acpi_rsdp(tables)) == OASIS_RTMR0_LOG[9]
    assert _sha384(acpi) == ACPI_TABLES[2815]
    # The same machine with 512 MiB: QEMU's DSDT describes the PCI hole above memory.
    dsdt = next(x for x in tables if x[0] == b"DSDT")
    smaller = bytearray(acpi)
    at = dsdt[2] - 684  # the hole's length field (and its minimum 12 bytes before)
    struct.pack_into("<I", smaller, at - 12, 512 * MIB)
    struct.pack_into("<I", smaller, at, 0xE0000000 - 512 * MIB)
    assert _sha384(bytes(smaller)) == ACPI_TABLES[512]
    assert t.acpi_loader(t.acpi_tables(bytes(smaller))) == t.acpi_loader(tables)


def test_rtmr0_events_are_what_ovmf_extended(ovmf: bytes, acpi: bytes) -> None:
    events = t.rtmr0_events(ovmf, memory_bytes=2815 * MIB, acpi_blob=acpi)
    assert [e.register for e in events] == [0] * len(OASIS_RTMR0_LOG)
    got = [e.digest.hex() for e in events]
    # Every event but the CFV (the firmware's own variable volume: Debian's build is not
    # the one oasis booted) is the one OVMF extended.
    assert [g for i, g in enumerate(got) if i != 1] == [
        e for i, e in enumerate(OASIS_RTMR0_LOG) if i != 1
    ]
    assert got[1] == _sha384(ovmf[:0x20000])  # Debian's CFV
    theirs_cfv = [dataclasses.replace(e, digest=bytes.fromhex(OASIS_RTMR0_LOG[1])) if e.name == "CFV" else e
                  for e in events]  # fmt: skip
    assert t.replay(theirs_cfv, 0).hex() == OASIS_RTMR0
    assert rtmr_replay([bytes.fromhex(h) for h in OASIS_RTMR0_LOG]).hex() == OASIS_RTMR0


def _initrd() -> bytes:
    return bytes((7 * i) % 256 for i in range(5000))


@pytest.mark.parametrize(("mib", "kernel", "initrd", "rtmr0", "rtmr1"), QUEX)
def test_rtmr0_and_rtmr1_equal_quex(
    ovmf: bytes, acpi: bytes, mib: int, kernel: str, initrd: bool, rtmr0: str, rtmr1: str
) -> None:
    image = synthetic_bzimage() if kernel == "default" else synthetic_bzimage(xloadflags=0)
    size = len(_initrd()) if initrd else None
    assert t.replay(t.rtmr0_events(ovmf, memory_bytes=mib * MIB, acpi_blob=acpi), 0).hex() == rtmr0
    events = t.rtmr1_events(image, memory_bytes=mib * MIB, initrd_size=size, cmdline=CMDLINE)
    assert [e.name for e in events[1:]] == [a.decode() for a in t.EFI_ACTIONS]
    assert t.replay(events, 1).hex() == rtmr1


def test_qemu_patches_the_setup_header_it_owns() -> None:
    image = synthetic_bzimage(xloadflags=0)
    patched = t.qemu_patched_kernel(
        image, memory_bytes=1024 * MIB, initrd_size=5000, cmdline=CMDLINE
    )
    changed = [i for i in range(len(image)) if image[i] != patched[i]]
    assert changed and all(0x210 <= i < 0x22C for i in changed)
    assert patched[0x210] == 0xB0 and struct.unpack_from("<I", patched, 0x228)[0] == 0x20000
    address, size = struct.unpack_from("<II", patched, 0x218)
    assert size == 5000 and address % 4096 == 0 and address + size < 1024 * MIB - 0x28000


@pytest.mark.parametrize(
    "kw",
    [{}, {"trailing": 0}, {"trailing": 5}, {"certificate": b"\x20\0\0\0\0\2\2\0" + bytes(24)}],
    ids=["trailing-16", "no-trailing", "unaligned-trailing", "certificate"],
)
def test_authenticode_equals_lief(kw: dict[str, object]) -> None:
    image = synthetic_bzimage(**kw)  # type: ignore[arg-type]
    pe = lief.PE.parse(list(image))
    assert pe is not None
    expected = bytes(pe.authentihash(lief.PE.ALGORITHMS.SHA_384))
    assert hashlib.sha384(t.pe_authenticode_preimage(image)).digest() == expected


def test_bad_inputs_are_named(ovmf: bytes, acpi: bytes) -> None:
    with pytest.raises(ConfigError, match="does not cover"):
        t.td_hob(tdvf_sections(ovmf), 4 * MIB)
    with pytest.raises(ConfigError, match="not a QEMU ACPI tables blob"):
        t.acpi_tables(b"\0" * 8)
    with pytest.raises(ConfigError, match="malformed"):
        t.acpi_tables(b"DSDT" + struct.pack("<I", 1 << 30) + bytes(64))
    xsdt = acpi[:] + b""
    with pytest.raises(ConfigError, match="no XSDT"):
        t.acpi_tables(xsdt.replace(b"RSDT", b"XSDT", 1))
    with pytest.raises(ConfigError, match="not a PE/COFF"):
        t.pe_authenticode_preimage(b"\0" * 0x800)
    uki = bytearray(synthetic_bzimage())
    uki[0x148 : 0x148 + 8] = b".linux\0\0"
    with pytest.raises(ConfigError, match="unified kernel"):
        t.pe_authenticode_preimage(bytes(uki))
    with pytest.raises(ConfigError, match="does not fit"):
        t.qemu_patched_kernel(synthetic_bzimage(xloadflags=0), memory_bytes=64 * MIB,
                              initrd_size=64 * MIB, cmdline=CMDLINE)  # fmt: skip


def test_measure_cli_computes_every_launch_register(
    ovmf: bytes, acpi: bytes, tmp_path: Path
) -> None:
    """`measure --launch tdx` with --memory and --acpi-tables computes RTMR0..2 (quex's
    values) and writes a policy `set-policy` accepts, with no register taken on trust."""
    import subprocess

    from sealserve.broker.completeness import policy_gaps
    from tests.conftest import sealserve_cmd, sealserve_env

    files = {"OVMF.fd": ovmf, "acpi.bin": acpi, "bzImage": synthetic_bzimage(), "initrd": _initrd()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "policy.toml"
    args = ("measure", "--launch", "tdx", "--ovmf", str(tmp_path / "OVMF.fd"),
            "--kernel", str(tmp_path / "bzImage"), "--initrd", str(tmp_path / "initrd"),
            "--append", CMDLINE, "--memory", "2048", "--acpi-tables", str(tmp_path / "acpi.bin"),
            "--policy-out", str(out))  # fmt: skip
    r = subprocess.run(sealserve_cmd(*args), env=sealserve_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, _, _, rtmr0, rtmr1 = QUEX[0]
    text = out.read_text()
    assert f'rtmr0 = ["{rtmr0}"]' in text and f'rtmr1 = ["{rtmr1}"]' in text
    assert "not computed" not in r.stdout
    assert policy_gaps(text, ["intel"]) == []
    # --acpi-tables without --memory is refused with the reason
    no_memory = [a for a in args[:-2] if a not in ("--memory", "2048")]
    r = subprocess.run(sealserve_cmd(*no_memory),
                       env=sealserve_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "--acpi-tables needs --memory" in r.stderr
