"""configfs-tsm backend against a fake configfs directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform
from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform
from sealserve.enclave.platform import attest, detect_platform
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import UnavailableError, VerificationError
from tests.attestation.conftest import read_vector

REPORT = read_vector("sev-snp/trustee/test-report.bin")


def fake_entry(root: Path, name: str = "e", *, provider: str = "sev_guest") -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "outblob").write_bytes(REPORT)
    (entry / "auxblob").write_bytes(b"aux")
    (entry / "provider").write_text(provider + "\n")
    (entry / "generation").write_text("1\n")
    return entry


def test_reads_a_report_through_the_entry(tmp_path: Path) -> None:
    entry = fake_entry(tmp_path)
    platform = ConfigfsTsmPlatform(tmp_path, entry_name="e", privlevel=0)
    produced = platform.report(b"\x01" * 64)
    assert (entry / "inblob").read_bytes() == b"\x01" * 64
    assert (entry / "privlevel").read_text() == "0"
    assert produced.report == REPORT and produced.certs == b"aux"
    assert produced.kind is Platform.SEV_SNP and platform.kind is Platform.SEV_SNP


def test_fresh_entry_is_created_and_removed(tmp_path: Path) -> None:
    class Fake(ConfigfsTsmPlatform):
        # A real configfs fills a new entry with attributes; emulate that on first write.
        def _write(self, entry: Path, name: str, data: bytes) -> None:
            if not (entry / "outblob").exists():
                (entry / "outblob").write_bytes(REPORT)
                (entry / "provider").write_text("sev_guest")
                (entry / "generation").write_text("4")
            super()._write(entry, name, data)

    produced = Fake(tmp_path).report(bytes(64))
    assert produced.report == REPORT and produced.certs == b""  # no auxblob
    # the plain directory cannot be rmdir'ed with files in it; exactly one entry was made
    assert len(list(tmp_path.iterdir())) == 1


def test_generation_change_is_refused(tmp_path: Path) -> None:
    entry = fake_entry(tmp_path)

    class Racy(ConfigfsTsmPlatform):
        def _read(self, e: Path, name: str) -> bytes:
            data = super()._read(e, name)
            if name == "outblob":  # another writer lands between our reads
                (entry / "generation").write_text("2\n")
            return data

    with pytest.raises(UnavailableError, match="generation changed from 1 to 2"):
        Racy(tmp_path, entry_name="e").report(bytes(64))


def test_unknown_provider_and_empty_outblob(tmp_path: Path) -> None:
    fake_entry(tmp_path, "a", provider="mystery")
    with pytest.raises(UnavailableError, match="unknown provider 'mystery'"):
        ConfigfsTsmPlatform(tmp_path, entry_name="a").report(bytes(64))
    (fake_entry(tmp_path, "b") / "outblob").write_bytes(b"")
    with pytest.raises(UnavailableError, match="empty report"):
        ConfigfsTsmPlatform(tmp_path, entry_name="b").report(bytes(64))


def test_tdx_provider(tmp_path: Path) -> None:
    fake_entry(tmp_path, provider="tdx_guest")
    platform = ConfigfsTsmPlatform(tmp_path, entry_name="e")
    assert platform.report(bytes(64)).kind is Platform.TDX and platform.kind is Platform.TDX
    with pytest.raises(UnavailableError, match="TDX are not supported"):
        platform.sealing_key(b"x")


def test_missing_configfs_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="configfs-tsm"):
        ConfigfsTsmPlatform(tmp_path / "absent").report(bytes(64))
    with pytest.raises(UnavailableError, match="cannot open"):
        ConfigfsTsmPlatform(tmp_path, sev_guest_device=tmp_path / "nodev").sealing_key(b"x")


def test_attest_builds_evidence(tmp_path: Path) -> None:
    fake_entry(tmp_path)
    ev = attest(
        ConfigfsTsmPlatform(tmp_path, entry_name="e"),
        nonce=b"n" * 32,
        tls_spki=b"s",
        manifest=b"m",
        hpke_public_key=b"h",
    )
    assert ev.report == REPORT and ev.nonce == b"n" * 32 and ev.platform is Platform.SEV_SNP
    with pytest.raises(VerificationError, match="nonce"):
        attest(
            ConfigfsTsmPlatform(tmp_path, entry_name="e"),
            nonce=b"short",
            tls_spki=b"",
            manifest=b"",
            hpke_public_key=b"",
        )


def test_detect_platform(tmp_path: Path, sim_root: Path) -> None:
    assert isinstance(detect_platform(configfs_root=tmp_path), ConfigfsTsmPlatform)
    found = detect_platform(configfs_root=tmp_path / "absent", simulated_dir=sim_root)
    assert isinstance(found, SimulatedPlatform)
    with pytest.raises(UnavailableError, match="no TEE found"):
        detect_platform(configfs_root=tmp_path / "absent")
