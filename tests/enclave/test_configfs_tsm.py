"""configfs-tsm backend against a fake configfs directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform
from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform
from sealserve.enclave.platform import attest
from sealserve.errors import UnavailableError, VerificationError
from tests.attestation.conftest import read_vector

REPORT = read_vector("sev-snp/trustee/test-report.bin")


def fill_entry(entry: Path, *, provider: str = "sev_guest", aux: bool = True) -> Path:
    """What the kernel shows in a fresh report entry, with the provider's answer."""
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "outblob").write_bytes(REPORT)
    if aux:
        (entry / "auxblob").write_bytes(b"aux")
    (entry / "provider").write_text(provider + "\n")
    (entry / "generation").write_text("0\n")
    return entry


class KernelLike(ConfigfsTsmPlatform):
    """A plain directory behaving like configfs: a new entry gets its attributes, and
    every attribute write bumps ``generation``."""

    def _generation(self, entry: Path) -> int:
        if not (entry / "generation").exists():
            fill_entry(entry, aux=False)
        return super()._generation(entry)

    def _write(self, entry: Path, name: str, data: bytes) -> None:
        super()._write(entry, name, data)
        gen = int((entry / "generation").read_text())
        (entry / "generation").write_text(f"{gen + 1}\n")


def test_reads_a_report_through_the_entry(tmp_path: Path) -> None:
    entry = fill_entry(tmp_path / "e")
    platform = KernelLike(tmp_path, entry_name="e", privlevel=0)
    produced = platform.report(b"\x01" * 64)
    assert (entry / "inblob").read_bytes() == b"\x01" * 64
    assert (entry / "privlevel").read_text() == "0"
    assert (entry / "generation").read_text() == "2\n"
    assert produced.report == REPORT and produced.certs == b"aux"
    assert produced.kind is Platform.SEV_SNP and platform.kind is Platform.SEV_SNP


def test_fresh_entry_is_created_and_removed(tmp_path: Path) -> None:
    produced = KernelLike(tmp_path).report(bytes(64))
    assert produced.report == REPORT and produced.certs == b""  # no auxblob
    # a plain directory cannot be rmdir'ed with files in it; exactly one entry was made
    assert len(list(tmp_path.iterdir())) == 1


def test_another_writer_is_detected(tmp_path: Path) -> None:
    entry = fill_entry(tmp_path / "e")

    class Racy(KernelLike):
        def _read(self, e: Path, name: str) -> bytes:
            data = super()._read(e, name)
            if name == "outblob":  # another process writes inblob between our steps
                self._write(entry, "inblob", b"\xff" * 64)
            return data

    with pytest.raises(UnavailableError, match="generation is 2, expected 1"):
        Racy(tmp_path, entry_name="e").report(bytes(64))


def test_static_generation_is_refused(tmp_path: Path) -> None:
    # A write that did not bump generation is not the kernel protocol we rely on.
    fill_entry(tmp_path / "e")
    with pytest.raises(UnavailableError, match="generation is 0, expected 1"):
        ConfigfsTsmPlatform(tmp_path, entry_name="e").report(bytes(64))


def test_unknown_provider_empty_outblob_bad_generation(tmp_path: Path) -> None:
    fill_entry(tmp_path / "a", provider="mystery")
    with pytest.raises(UnavailableError, match="unknown provider 'mystery'"):
        KernelLike(tmp_path, entry_name="a").report(bytes(64))
    (fill_entry(tmp_path / "b") / "outblob").write_bytes(b"")
    with pytest.raises(UnavailableError, match="empty report"):
        KernelLike(tmp_path, entry_name="b").report(bytes(64))
    (fill_entry(tmp_path / "c") / "generation").write_text("zz")
    with pytest.raises(UnavailableError, match="unreadable generation"):
        KernelLike(tmp_path, entry_name="c").report(bytes(64))


def test_tdx_provider(tmp_path: Path) -> None:
    fill_entry(tmp_path / "e", provider="tdx_guest")
    platform = KernelLike(tmp_path, entry_name="e")
    assert platform.report(bytes(64)).kind is Platform.TDX and platform.kind is Platform.TDX
    with pytest.raises(UnavailableError, match="TDX are not supported"):
        platform.sealing_key(b"x")


def test_missing_configfs_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="configfs-tsm"):
        ConfigfsTsmPlatform(tmp_path / "absent").report(bytes(64))
    with pytest.raises(UnavailableError, match="cannot open"):
        ConfigfsTsmPlatform(tmp_path, sev_guest_device=tmp_path / "nodev").sealing_key(b"x")
    with pytest.raises(ValueError, match="64 bytes"):
        ConfigfsTsmPlatform(tmp_path).report(b"short")


def test_attest_builds_evidence(tmp_path: Path) -> None:
    fill_entry(tmp_path / "e")
    ev = attest(
        KernelLike(tmp_path, entry_name="e"),
        nonce=b"n" * 32,
        tls_spki=b"s",
        manifest=b"m",
        hpke_public_key=b"h",
    )
    assert ev.report == REPORT and ev.certs == b"aux" and ev.nonce == b"n" * 32
    assert ev.platform is Platform.SEV_SNP
    with pytest.raises(VerificationError, match="nonce"):
        attest(
            KernelLike(tmp_path, entry_name="e"),
            nonce=b"short",
            tls_spki=b"",
            manifest=b"",
            hpke_public_key=b"",
        )
