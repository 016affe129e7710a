"""SEV-SNP derived keys through /dev/sev-guest (SNP_GET_DERIVED_KEY).

The firmware derives a key from a chip secret (the VCEK root, or the VM root key)
mixed with guest fields we select: here the guest policy and the launch MEASUREMENT,
so a guest with another measurement or policy gets another key. Layouts follow
include/uapi/linux/sev-guest.h and the SEV-SNP ABI "MSG_KEY_REQ/MSG_KEY_RSP".
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealserve.errors import UnavailableError

DEFAULT_DEVICE = Path("/dev/sev-guest")

# GUEST_FIELD_SELECT bits (ABI spec, MSG_KEY_REQ)
FIELD_GUEST_POLICY = 1 << 0
FIELD_IMAGE_ID = 1 << 1
FIELD_FAMILY_ID = 1 << 2
FIELD_MEASUREMENT = 1 << 3
FIELD_GUEST_SVN = 1 << 4
FIELD_TCB_VERSION = 1 << 5
DEFAULT_FIELDS = FIELD_GUEST_POLICY | FIELD_MEASUREMENT
ROOT_KEY_VCEK = 0


class _KeyRequest(ctypes.Structure):
    _fields_ = (
        ("root_key_select", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint32),
        ("guest_field_select", ctypes.c_uint64),
        ("vmpl", ctypes.c_uint32),
        ("guest_svn", ctypes.c_uint32),
        ("tcb_version", ctypes.c_uint64),
    )


class _KeyResponse(ctypes.Structure):
    _fields_ = (("data", ctypes.c_uint8 * 64),)


class _GuestRequest(ctypes.Structure):
    _fields_ = (
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    )


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


SNP_GET_DERIVED_KEY = _iowr(ord("S"), 0x1, ctypes.sizeof(_GuestRequest))

Ioctl = Callable[[int, int, Any, bool], Any]


def snp_derived_key(
    *,
    device: str | Path = DEFAULT_DEVICE,
    field_select: int = DEFAULT_FIELDS,
    vmpl: int = 0,
    ioctl: Ioctl = fcntl.ioctl,
) -> bytes:
    """A 32-byte key from the SEV-SNP firmware, rooted in the VCEK secret and mixed
    with the selected guest fields (default: guest policy and measurement).

    ``vmpl`` must be at least the VMPL the guest runs at. Raises UnavailableError when
    the device is missing or the firmware refuses.
    """
    request = _KeyRequest(root_key_select=ROOT_KEY_VCEK, guest_field_select=field_select, vmpl=vmpl)
    response = _KeyResponse()
    guest = _GuestRequest(
        msg_version=1,
        req_data=ctypes.addressof(request),
        resp_data=ctypes.addressof(response),
    )
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise UnavailableError(f"sev-guest: cannot open {device}: {exc}") from exc
    try:
        ioctl(fd, SNP_GET_DERIVED_KEY, guest, True)
    except OSError as exc:
        raise UnavailableError(
            f"sev-guest: SNP_GET_DERIVED_KEY failed: {exc} (exitinfo2 {guest.exitinfo2:#x})"
        ) from exc
    finally:
        os.close(fd)
    data = bytes(response.data)
    # The key must not linger in the ctypes buffer longer than needed.
    ctypes.memset(ctypes.addressof(response), 0, ctypes.sizeof(response))
    status = int.from_bytes(data[0:4], "little")
    if status != 0:
        raise UnavailableError(f"sev-guest: the firmware refused the key request (status {status})")
    return data[0x20:0x40]
