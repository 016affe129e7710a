"""TDX RTMR0 and RTMR1 of a QEMU direct boot through OVMF/TDVF: the events the firmware
extends, rebuilt from the firmware image, the TD's memory size, the VMM's ACPI tables
and the kernel.

RTMR0 (OVMF's TCG measurements of the platform configuration, in this order):

1. the TD HOB QEMU hands the firmware (``EV_EFI_HANDOFF_TABLES2``): a handoff-info HOB
   and one resource-descriptor HOB per memory range, the firmware's TD_HOB and
   temporary-memory sections as system memory, everything else below and above 4 GiB
   as unaccepted memory (the end-of-list HOB is not hashed);
2. the configuration firmware volume, the CFV section's bytes
   (``EV_EFI_PLATFORM_FIRMWARE_BLOB2``);
3. the Secure Boot variables SecureBoot, PK, KEK, db, dbx as UEFI_VARIABLE_DATA
   (vendor GUID, name length, data length, UTF-16LE name, data; data from the
   firmware's authenticated variable store, empty when not enrolled);
4. a separator (four zero bytes);
5. QEMU's ACPI table loader script, the RSDP and the ACPI tables blob
   (``EV_PLATFORM_CONFIG_FLAGS``; the loader and RSDP are rebuilt from the tables);
6. the BootOrder (``0000``) and Boot0000 (OVMF's UiApp) boot variables;
7. a separator.

RTMR1: the Authenticode SHA-384 of the kernel as OVMF loads it, that is *after* QEMU
patched its setup header (loader type, heap, command-line pointer and, with an
initrd, the initrd's address and size, which depend on the memory size), then the EFI
actions "Calling EFI Application from Boot Option", "Exit Boot Services Invocation"
and "Exit Boot Services Returned with Success".

Known answers (tests/data/launch/tdx/SOURCES.md): the TD HOB of 15 memory sizes, the
Secure Boot variable, separator and boot-variable events, the loader and RSDP of a
QEMU ACPI blob and a whole RTMR0, all as OVMF computed them in real TDs (oasisprotocol/cli
test vectors); RTMR0 and RTMR1 as quex's independent implementation computes them for
Debian's OVMF. A unified kernel image (a ``.linux`` section) is not handled.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sealserve.attestation.tdx_launch import TdvfSection, rtmr_replay, tdvf_sections
from sealserve.errors import ConfigError

_TD_HOB, _CFV, _TEMP_MEM = 2, 1, 3
_SYSTEM_MEMORY, _UNACCEPTED = 0, 7
_FOUR_GIB = 1 << 32
_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
_AUTH_VARIABLE_STORE = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792").bytes_le
# OVMF's Boot0000: the UiApp load option (attributes, description, FvFile device path).
_UIAPP_OPTION = (
    bytes([0x09, 0x01, 0x00, 0x00, 0x2C, 0x00])
    + "UiApp\0".encode("utf-16-le")
    + bytes([0x04, 0x07, 0x14, 0x00])
    + uuid.UUID("7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1").bytes_le
    + bytes([0x04, 0x06, 0x14, 0x00])
    + uuid.UUID("462caa21-7614-4503-836e-8ab6f4662331").bytes_le
    + bytes([0x7F, 0xFF, 0x04, 0x00])
)
EFI_ACTIONS = (
    b"Calling EFI Application from Boot Option",
    b"Exit Boot Services Invocation",
    b"Exit Boot Services Returned with Success",
)
_SEPARATOR = bytes(4)
_MAX_ACPI = 1 << 20
_MAX_KERNEL = 512 << 20
# QEMU keeps this much below the top of low memory for ACPI data (x86_load_linux).
_ACPI_DATA_SIZE = 0x20000 + 0x8000


@dataclass(frozen=True)
class Event:
    """One measurement: what it is, its RTMR, its SHA-384 digest."""

    name: str
    register: int
    digest: bytes


def _event(name: str, register: int, preimage: bytes) -> Event:
    return Event(name, register, hashlib.sha384(preimage).digest())


def memory_layout(memory_bytes: int) -> tuple[int, int]:
    """(bytes below 4 GiB, bytes above 4 GiB) of a QEMU q35 TD with this much memory:
    all of it low up to 2816 MiB, else 2 GiB low and the rest from 4 GiB."""
    low = 0x80000000 if memory_bytes >= 0xB0000000 else 0xB0000000
    if memory_bytes >= low:
        return low, memory_bytes - low
    return memory_bytes, 0


def td_hob(sections: Sequence[TdvfSection], memory_bytes: int) -> bytes:
    """The hashed part of the TD HOB QEMU builds for ``memory_bytes`` of memory.
    Raises ConfigError when the firmware has no TD_HOB section or the memory does not
    cover its sections."""
    hob = next((s for s in sections if s.kind == _TD_HOB), None)
    if hob is None:
        raise ConfigError("tdx firmware: no TD_HOB section in the TDVF metadata")
    below, above = memory_layout(memory_bytes)
    ranges: list[tuple[int, int, int]] = []
    pos = 0
    for s in sorted(
        (s for s in sections if s.kind in (_TD_HOB, _TEMP_MEM)), key=lambda s: s.address
    ):
        if s.address > pos:
            ranges.append((pos, s.address, _UNACCEPTED))
        ranges.append((s.address, s.address + s.memory_size, _SYSTEM_MEMORY))
        pos = s.address + s.memory_size
    if pos > below:
        raise ConfigError(
            f"tdx: {memory_bytes >> 20} MiB of memory does not cover the firmware's "
            f"sections (they end at {pos:#x})"
        )
    if pos < below:
        ranges.append((pos, below, _UNACCEPTED))
    if above:
        ranges.append((_FOUR_GIB, _FOUR_GIB + above, _UNACCEPTED))
    body = b"".join(
        struct.pack("<HHI16sIIQQ", 3, 48, 0, bytes(16), kind, 7, start, end - start)
        for start, end, kind in ranges
    )
    end_of_list = hob.address + 56 + len(body) + 8  # the end HOB follows, unhashed
    handoff = struct.pack("<HHIIIQQQQQ", 1, 56, 0, 9, 0, 0, 0, 0, 0, end_of_list)
    return handoff + body


def efi_variables(firmware: bytes, sections: Sequence[TdvfSection]) -> dict[str, bytes]:
    """The variables (name -> data) in the authenticated variable store of the CFV.
    Raises ConfigError when there is none or it is malformed."""
    cfv = next((s for s in sections if s.kind == _CFV), None)
    if cfv is None:
        raise ConfigError("tdx firmware: no CFV (configuration firmware volume) section")
    region = firmware[cfv.data_offset : cfv.data_offset + cfv.raw_size]
    at = region.find(_AUTH_VARIABLE_STORE)
    if at < 0 or at + 28 > len(region):
        raise ConfigError("tdx firmware: no authenticated variable store in the CFV")
    size, fmt, state = struct.unpack_from("<IBB", region, at + 16)
    if fmt != 0x5A or state != 0xFE or at + size > len(region):
        raise ConfigError(f"tdx firmware: variable store format {fmt:#x}/{state:#x} not healthy")
    end = at + size
    pos = at + 28
    out: dict[str, bytes] = {}
    while pos + 60 <= end:
        magic, var_state = struct.unpack_from("<HB", region, pos)
        if magic != 0x55AA:
            break
        name_size, data_size = struct.unpack_from("<II", region, pos + 36)
        name_at = pos + 60
        data_at = name_at + name_size
        if data_at + data_size > end or name_size % 2:
            raise ConfigError("tdx firmware: a variable overruns the variable store")
        if var_state == 0x3F:  # VAR_ADDED, not deleted or in transition
            name = region[name_at:data_at].decode("utf-16-le", "replace").rstrip("\0")
            out[name] = region[data_at : data_at + data_size]
        pos = (data_at + data_size + 3) & ~3
    return out


def _variable(vendor: uuid.UUID, name: str, data: bytes) -> bytes:
    return (
        vendor.bytes_le + struct.pack("<QQ", len(name), len(data)) + name.encode("utf-16-le") + data
    )


def acpi_tables(blob: bytes) -> list[tuple[bytes, int, int]]:
    """(signature, offset, length) of each table in QEMU's ``etc/acpi/tables`` blob.
    Raises ConfigError for a blob that is not one."""
    if not 36 <= len(blob) <= _MAX_ACPI:
        raise ConfigError(f"tdx: {len(blob)} bytes is not a QEMU ACPI tables blob")
    out = []
    pos = 0
    while pos + 8 <= len(blob) and blob[pos : pos + 4] != bytes(4):
        signature = blob[pos : pos + 4]
        (length,) = struct.unpack_from("<I", blob, pos + 4)
        if length < 36 or pos + length > len(blob) or not signature.isalnum():
            raise ConfigError(f"tdx: ACPI table at offset {pos} is malformed")
        out.append((signature, pos, length))
        pos += length
    names = [t[0] for t in out]
    if b"RSDT" not in names or b"XSDT" in names:
        raise ConfigError("tdx: the ACPI blob needs an RSDT and no XSDT (QEMU's q35 layout)")
    return out


def _cmd(command: int, *fields: bytes) -> bytes:
    return (struct.pack("<I", command) + b"".join(fields)).ljust(128, b"\0")


def _name(file: str) -> bytes:
    return file.encode().ljust(56, b"\0")


def acpi_loader(tables: list[tuple[bytes, int, int]]) -> bytes:
    """QEMU's ``etc/table-loader`` script (4 KiB of 128-byte commands) for these tables."""
    rsdp, blob = "etc/acpi/rsdp", "etc/acpi/tables"

    def pointer(dest: str, src: str, offset: int, size: int) -> bytes:
        return _cmd(2, _name(dest), _name(src), struct.pack("<IB", offset, size))

    def checksum(file: str, at: int, start: int, length: int) -> bytes:
        return _cmd(3, _name(file), struct.pack("<III", at, start, length))

    cmds = [_cmd(1, _name(rsdp), struct.pack("<IB", 16, 2)),
            _cmd(1, _name(blob), struct.pack("<IB", 64, 1))]  # fmt: skip
    for signature, offset, length in tables:
        if signature == b"FACP":  # FIRMWARE_CTRL, DSDT, X_DSDT
            cmds += [
                pointer(blob, blob, offset + at, size) for at, size in ((36, 4), (40, 4), (140, 8))
            ]
        if signature == b"RSDT":
            cmds += [pointer(blob, blob, offset + 36 + 4 * i, 4) for i in range((length - 36) // 4)]
        if signature != b"FACS":
            cmds.append(checksum(blob, offset + 9, offset, length))
    cmds += [pointer(rsdp, blob, 16, 4), checksum(rsdp, 8, 0, 20)]
    return b"".join(cmds).ljust(4096, b"\0")


def acpi_rsdp(tables: list[tuple[bytes, int, int]]) -> bytes:
    """The RSDP QEMU writes (revision 0, OEM "BOCHS ", RSDT offset; checksum 0)."""
    rsdt = next(offset for signature, offset, _ in tables if signature == b"RSDT")
    return b"RSD PTR \0BOCHS \0" + struct.pack("<I", rsdt)


def rtmr0_events(firmware: bytes, *, memory_bytes: int, acpi_blob: bytes) -> list[Event]:
    """The RTMR0 events of a TD booted from ``firmware`` (module docstring)."""
    sections = tdvf_sections(firmware)
    cfv = next((s for s in sections if s.kind == _CFV), None)
    if cfv is None:
        raise ConfigError("tdx firmware: no CFV (configuration firmware volume) section")
    if cfv.data_offset + cfv.raw_size > len(firmware):
        raise ConfigError("tdx firmware: the CFV section lies outside the image")
    variables = efi_variables(firmware, sections)
    secure_boot = (
        b"\x01"
        if "PK" in variables and variables.get("SecureBootEnable", b"\x01")[:1] == b"\x01"
        else b""
    )
    tables = acpi_tables(acpi_blob)
    events = [
        _event("TD HOB", 0, td_hob(sections, memory_bytes)),
        _event("CFV", 0, firmware[cfv.data_offset : cfv.data_offset + cfv.raw_size]),
        _event("SecureBoot", 0, _variable(_GLOBAL_VARIABLE, "SecureBoot", secure_boot)),
    ]
    for vendor, name in ((_GLOBAL_VARIABLE, "PK"), (_GLOBAL_VARIABLE, "KEK"),
                         (_SECURITY_DATABASE, "db"), (_SECURITY_DATABASE, "dbx")):  # fmt: skip
        events.append(_event(name, 0, _variable(vendor, name, variables.get(name, b""))))
    events += [
        _event("separator", 0, _SEPARATOR),
        _event("ACPI table loader", 0, acpi_loader(tables)),
        _event("ACPI RSDP", 0, acpi_rsdp(tables)),
        _event("ACPI tables", 0, acpi_blob),
        _event("BootOrder", 0, b"\0\0"),
        _event("Boot0000", 0, _UIAPP_OPTION),
        _event("separator", 0, _SEPARATOR),
    ]
    return events


def qemu_patched_kernel(kernel: bytes, *, memory_bytes: int, initrd_size: int | None,
                        cmdline: str) -> bytes:  # fmt: skip
    """The kernel as QEMU hands it to the firmware: its setup header patched as
    ``x86_load_linux`` does (Linux boot protocol). Raises ConfigError for a kernel that is
    not a bzImage, or an initrd that does not fit."""
    if not 0x400 <= len(kernel) <= _MAX_KERNEL:
        raise ConfigError(f"tdx: a {len(kernel)}-byte kernel is not a bzImage")
    k = bytearray(kernel)
    protocol = struct.unpack_from("<H", k, 0x206)[0] if k[0x202:0x206] == b"HdrS" else 0
    if protocol < 0x202 or not k[0x211] & 0x01:
        real, cmdline_at = 0x90000, 0x9A000 - ((len(cmdline) + 16) & ~15)
    else:
        real, cmdline_at = 0x10000, 0x20000
    if protocol >= 0x20C and struct.unpack_from("<H", k, 0x236)[0] & 2:
        initrd_max = 0xFFFFFFFF
    elif protocol >= 0x203:
        initrd_max = struct.unpack_from("<I", k, 0x22C)[0]
    else:
        initrd_max = 0x37FFFFFF
    below, _ = memory_layout(memory_bytes)
    initrd_max = min(initrd_max, below - _ACPI_DATA_SIZE - 1)
    if protocol >= 0x202:
        struct.pack_into("<I", k, 0x228, cmdline_at)
    else:
        struct.pack_into("<HH", k, 0x20, 0xA33F, cmdline_at - real)
    if protocol >= 0x200:
        k[0x210] = 0xB0  # type_of_loader: QEMU
    if protocol >= 0x201:
        k[0x211] |= 0x80  # CAN_USE_HEAP
        struct.pack_into("<H", k, 0x224, cmdline_at - real - 0x200)
    if initrd_size is not None:
        if protocol < 0x200:
            raise ConfigError("tdx: the kernel's boot protocol is too old for an initrd")
        if initrd_size >= initrd_max:
            raise ConfigError(
                f"tdx: a {initrd_size}-byte initrd does not fit below {initrd_max:#x}"
            )
        struct.pack_into("<II", k, 0x218, (initrd_max - initrd_size) & ~0xFFF, initrd_size)
    return bytes(k)


def pe_authenticode_preimage(pe: bytes) -> bytes:
    """What OVMF hashes to measure a PE/COFF image (its Authenticode digest): the
    headers without CheckSum and the certificate-table entry, the sections in file
    order, then any data after them except the certificate table. Raises ConfigError."""
    try:
        (pe_at,) = struct.unpack_from("<I", pe, 0x3C)
        if pe[:2] != b"MZ" or pe[pe_at : pe_at + 4] != b"PE\0\0":
            raise ConfigError("tdx: the kernel is not a PE/COFF image (no EFI stub)")
        count, opt_size = struct.unpack_from("<H12xH", pe, pe_at + 6)
        opt = pe_at + 24
        (magic,) = struct.unpack_from("<H", pe, opt)
        if magic not in (0x10B, 0x20B):
            raise ConfigError(f"tdx: unknown PE optional header magic {magic:#x}")
        (headers_size,) = struct.unpack_from("<I", pe, opt + 60)
        dirs = opt + (96 if magic == 0x10B else 112)
        (dir_count,) = struct.unpack_from("<I", pe, dirs - 4)
        checksum = opt + 64
        parts = [pe[:checksum]]
        cert_size = 0
        if dir_count > 4:
            cert_entry = dirs + 4 * 8
            (cert_size,) = struct.unpack_from("<I", pe, cert_entry + 4)
            parts += [pe[checksum + 4 : cert_entry], pe[cert_entry + 8 : headers_size]]
        else:
            parts.append(pe[checksum + 4 : headers_size])
        table = opt + opt_size
        raw = []
        for i in range(count):
            size, pointer = struct.unpack_from("<II", pe, table + 40 * i + 16)
            name = pe[table + 40 * i : table + 40 * i + 8]
            if name.rstrip(b"\0") == b".linux":
                raise ConfigError("tdx: unified kernel images (.linux section) are not handled")
            if size:
                raw.append((pointer, size))
    except struct.error as exc:
        raise ConfigError("tdx: the kernel's PE headers are truncated") from exc
    hashed = headers_size
    for pointer, size in sorted(raw):
        if pointer + size > len(pe):
            raise ConfigError("tdx: a PE section lies outside the kernel file")
        parts.append(pe[pointer : pointer + size])
        hashed += size
    if len(pe) > hashed + cert_size:
        parts.append(pe[hashed : len(pe) - cert_size])
    elif len(pe) < hashed + cert_size:
        raise ConfigError("tdx: the kernel file is shorter than its sections and certificates")
    return b"".join(parts)


def rtmr1_events(kernel: bytes, *, memory_bytes: int, initrd_size: int | None,
                 cmdline: str) -> list[Event]:  # fmt: skip
    """The RTMR1 events of a QEMU direct boot of ``kernel`` (module docstring)."""
    patched = qemu_patched_kernel(kernel, memory_bytes=memory_bytes, initrd_size=initrd_size,
                                  cmdline=cmdline)  # fmt: skip
    events = [
        _event("kernel (Authenticode, as QEMU patched it)", 1, pe_authenticode_preimage(patched))
    ]
    return events + [_event(a.decode(), 1, a) for a in EFI_ACTIONS]


def replay(events: Sequence[Event], register: int) -> bytes:
    """The register's value after the events that go to it."""
    return rtmr_replay([e.digest for e in events if e.register == register])
