"""SNP_GET_DERIVED_KEY marshalling, against a fake ioctl (no hardware here)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest

from sealserve.enclave import sev_guest
from sealserve.enclave.configfs_tsm import ConfigfsTsmPlatform
from sealserve.enclave.sev_guest import (
    DEFAULT_FIELDS,
    FIELD_MEASUREMENT,
    SNP_GET_DERIVED_KEY,
    snp_derived_key,
)
from sealserve.errors import UnavailableError


class FakeFirmware:
    """Reads the request the way the kernel does and answers MSG_KEY_RSP."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.seen: dict[str, int] = {}

    def __call__(self, fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert request == SNP_GET_DERIVED_KEY == 0xC0205301 and mutate
        guest = sev_guest._GuestRequest.from_buffer(arg)
        req = sev_guest._KeyRequest.from_address(guest.req_data)
        self.seen = {
            "msg_version": guest.msg_version,
            "root": req.root_key_select,
            "fields": req.guest_field_select,
            "vmpl": req.vmpl,
        }
        resp = (ctypes.c_uint8 * 64).from_address(guest.resp_data)
        payload = self.status.to_bytes(4, "little") + bytes(28) + bytes(range(32))
        ctypes.memmove(resp, payload, 64)
        return 0


@pytest.fixture
def device(tmp_path: Path) -> Path:
    dev = tmp_path / "sev-guest"
    dev.write_bytes(b"")
    return dev


def test_request_layout_and_key(device: Path) -> None:
    fw = FakeFirmware()
    key = snp_derived_key(device=device, vmpl=1, ioctl=fw)
    assert key == bytes(range(32))
    assert fw.seen == {"msg_version": 1, "root": 0, "fields": DEFAULT_FIELDS, "vmpl": 1}
    assert DEFAULT_FIELDS & FIELD_MEASUREMENT


def test_firmware_refusal(device: Path) -> None:
    with pytest.raises(UnavailableError, match="refused the key request"):
        snp_derived_key(device=device, ioctl=FakeFirmware(status=0x16))


def test_ioctl_error(device: Path) -> None:
    def failing(*_: Any) -> int:
        raise OSError(22, "Invalid argument")

    with pytest.raises(UnavailableError, match="SNP_GET_DERIVED_KEY failed"):
        snp_derived_key(device=device, ioctl=failing)


def test_configfs_platform_seals_with_the_derived_key(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fw = FakeFirmware()
    real = sev_guest.snp_derived_key
    monkeypatch.setattr(
        "sealserve.enclave.configfs_tsm.snp_derived_key",
        lambda **kw: real(ioctl=fw, **kw),
    )
    platform = ConfigfsTsmPlatform(device.parent, sev_guest_device=device)
    a, b = platform.sealing_key(b"ledger"), platform.sealing_key(b"audit")
    assert len(a) == 32 and a != b and a != bytes(range(32))
