"""TDX launch reference values: the MRTD (and the RTMRs we can compute exactly) of a TD
launched by QEMU from an OVMF/TDVF firmware, a kernel, an initrd and a command line.

MRTD follows Intel's *TDX Virtual Firmware Design Guide* (TDVF metadata) and the TDX
module ABI (TDH.MEM.PAGE.ADD, TDH.MR.EXTEND):

1. Find the TDVF metadata: the OVMF GUIDed table that ends 32 bytes before the end of
   the image (footer GUID 96b582de-…), its entry e47a6535-… holds the metadata's offset
   from the end of the image; the metadata starts with GUID e9eaf9f3-… and a
   ``TDVF`` descriptor (version 1) followed by 32-byte section entries.
2. For each section, in metadata order, for each 4 KiB page of ``MemoryDataSize``:
   TDH.MEM.PAGE.ADD extends MRTD with a 128-byte buffer ``"MEM.PAGE.ADD"`` ‖ pad ‖
   GPA (u64 LE at offset 16) ‖ zeros — unless the section's attribute PAGE.AUG (bit 1)
   says the page is added later by the guest (then it is not measured).
3. For a section with attribute MR.EXTEND (bit 0), each 256-byte chunk of each page:
   TDH.MR.EXTEND extends MRTD with ``"MR.EXTEND"`` ‖ pad ‖ GPA (u64 LE at 16) ‖ zeros
   (128 bytes) followed by the chunk's 256 bytes of image data.
4. MRTD is SHA-384 over that whole sequence (the TDX module keeps one running hash).

The order of steps 2 and 3 is the VMM's: upstream Linux KVM (``KVM_TDX_INIT_MEM_REGION``
with ``KVM_TDX_MEASURE_MEMORY_REGION``) and QEMU 9+ TDX builds add and extend page by
page (``per-page``); QEMU 8.x TDX builds added all pages of a section and then
extended them (``per-section``; dstack-mr's "two-pass"). Both are offered; the right
one is the one whose MRTD your TD reports.

RTMR2 (QEMU direct boot of a Linux kernel through OVMF, kernel ≥ 6.x EFI stub): the
stub measures, into PCR 9 → RTMR2, (a) the load options — the command line, with
`` initrd=initrd`` appended by OVMF when an initrd is passed, as UTF-16LE with its NUL
— and (b) the initrd bytes. RTMR2 = extend(extend(0, SHA-384(a)), SHA-384(b)).

RTMR0 (TD HOB, CFV, Secure Boot variables, the VMM's ACPI tables, boot variables) and
RTMR1 (Authenticode hash of the kernel after QEMU patched its setup header, then the
EFI boot actions) are in ``sealserve.attestation.tdx_rtmr``: they need the TD's memory
size and, for RTMR0, QEMU's ACPI tables for the machine shape.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sealserve.attestation.launch import check_boot_parts
from sealserve.errors import ConfigError

TDX_REGISTER_LEN = 48
PAGE = 0x1000
CHUNK = 0x100
PAGE_ORDERS = ("per-page", "per-section")
_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
_TDX_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
_TDVF_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae").bytes_le
_ATTR_MR_EXTEND = 0x1
_ATTR_PAGE_AUG = 0x2
_SECTION_TYPES = {0: "BFV", 1: "CFV", 2: "TD_HOB", 3: "TempMem", 4: "PermMem", 5: "Payload",
                  6: "PayloadParam", 7: "TD_INFO", 8: "TD_PARAMS"}  # fmt: skip
_MAX_FIRMWARE = 64 << 20
# Pages TDH.MEM.PAGE.ADDed at build time: a few MiB in any TDVF; a bound keeps a
# corrupt size field from becoming an endless loop.
_MAX_ADDED_MEMORY = 4 << 30


@dataclass(frozen=True)
class TdvfSection:
    """One TDVF metadata section entry (TDVF Design Guide, table "TDVF_SECTION")."""

    data_offset: int
    raw_size: int
    address: int
    memory_size: int
    kind: int
    attributes: int

    @property
    def extend_mr(self) -> bool:
        return bool(self.attributes & _ATTR_MR_EXTEND)

    @property
    def page_aug(self) -> bool:
        return bool(self.attributes & _ATTR_PAGE_AUG)

    @property
    def kind_name(self) -> str:
        return _SECTION_TYPES.get(self.kind, f"type {self.kind}")


def tdvf_sections(firmware: bytes) -> list[TdvfSection]:
    """The TDVF metadata sections of an OVMF/TDVF image.

    Raises ConfigError naming what is wrong: no OVMF table footer, no TDX metadata
    entry, a bad descriptor, or a section that is unaligned or outside the image.
    """
    size = len(firmware)
    if size < 0x1000 or size > _MAX_FIRMWARE:
        raise ConfigError(f"tdx firmware: {size} bytes is not an OVMF/TDVF image")
    # 1. The GUIDed table: footer GUID at end-48, its 16-bit length just before it.
    end = size - 32
    if firmware[end - 16 : end] != _FOOTER_GUID:
        raise ConfigError("tdx firmware: no OVMF table footer (not an OVMF/TDVF image)")
    (table_len,) = struct.unpack_from("<H", firmware, end - 18)
    start = end - table_len
    if table_len < 18 or start < 0:
        raise ConfigError(f"tdx firmware: bad OVMF table length {table_len}")
    pos = end - 18
    meta_from_end: int | None = None
    while pos - 18 >= start:
        guid = firmware[pos - 16 : pos]
        (entry_len,) = struct.unpack_from("<H", firmware, pos - 18)
        if entry_len < 18 or pos - entry_len < start:
            raise ConfigError(f"tdx firmware: bad OVMF table entry length {entry_len}")
        if guid == _TDX_OFFSET_GUID:
            if entry_len < 22:
                raise ConfigError(f"tdx firmware: TDX metadata entry of {entry_len} bytes")
            (meta_from_end,) = struct.unpack_from("<I", firmware, pos - 22)
            break
        pos -= entry_len
    if meta_from_end is None:
        raise ConfigError("tdx firmware: no TDX metadata entry (firmware built without TDX)")
    meta = size - meta_from_end
    if not 16 <= meta <= size - 32 or firmware[meta - 16 : meta] != _TDVF_GUID:
        raise ConfigError("tdx firmware: the TDX metadata offset does not point at TDVF metadata")
    signature, length, version, count = struct.unpack_from("<4sIII", firmware, meta)
    if signature != b"TDVF" or version != 1:
        raise ConfigError(f"tdx firmware: bad TDVF descriptor ({signature!r}, version {version})")
    if count == 0 or length != 16 + 32 * count or meta + length > size:
        raise ConfigError(f"tdx firmware: bad TDVF descriptor ({count} sections, {length} bytes)")
    # 2. The section entries, checked as QEMU checks them before it builds the TD.
    sections = []
    for i in range(count):
        s = TdvfSection(*struct.unpack_from("<IIQQII", firmware, meta + 16 + 32 * i))
        if s.address % PAGE or s.memory_size % PAGE:
            raise ConfigError(f"tdx firmware: section {i} ({s.kind_name}) is not 4 KiB aligned")
        if s.raw_size > s.memory_size:
            raise ConfigError(f"tdx firmware: section {i} raw data exceeds its memory size")
        if s.extend_mr and s.data_offset + s.memory_size > size:
            raise ConfigError(f"tdx firmware: section {i} ({s.kind_name}) lies outside the image")
        sections.append(s)
    added = sum(s.memory_size for s in sections if not s.page_aug)
    if added > _MAX_ADDED_MEMORY:
        raise ConfigError(
            f"tdx firmware: the sections add {added >> 20} MiB of pages at build time "
            f"(more than {_MAX_ADDED_MEMORY >> 30} GiB: not a firmware image)"
        )
    return sections


def tdx_mrtd(firmware: bytes, *, page_order: str = "per-page") -> bytes:
    """The 48-byte MRTD of a TD built from this OVMF/TDVF image (steps in the module
    docstring). Raises ConfigError for an image without valid TDVF metadata or an
    unknown ``page_order``."""
    if page_order not in PAGE_ORDERS:
        raise ConfigError(f"tdx: page order must be one of {', '.join(PAGE_ORDERS)}")
    h = hashlib.sha384()
    for s in tdvf_sections(firmware):
        pages = range(s.memory_size // PAGE)
        if page_order == "per-page":
            for page in pages:
                _page_add(h, s, page)
                _extend(h, s, page, firmware)
        else:
            for page in pages:
                _page_add(h, s, page)
            for page in pages:
                _extend(h, s, page, firmware)
    return h.digest()


def _page_add(h: hashlib._Hash, s: TdvfSection, page: int) -> None:
    if not s.page_aug:
        h.update(b"MEM.PAGE.ADD".ljust(16, b"\0") + struct.pack("<Q", s.address + page * PAGE)
                 + bytes(104))  # fmt: skip


def _extend(h: hashlib._Hash, s: TdvfSection, page: int, firmware: bytes) -> None:
    if not s.extend_mr:
        return
    for off in range(page * PAGE, (page + 1) * PAGE, CHUNK):
        h.update(b"MR.EXTEND".ljust(16, b"\0") + struct.pack("<Q", s.address + off) + bytes(104))
        h.update(firmware[s.data_offset + off : s.data_offset + off + CHUNK])


def rtmr_replay(digests: Iterator[bytes] | list[bytes]) -> bytes:
    """An RTMR after extending each 48-byte digest in turn from zero."""
    value = bytes(TDX_REGISTER_LEN)
    for d in digests:
        value = hashlib.sha384(value + d).digest()
    return value


def tdx_rtmr2(*, cmdline: str, initrd: bytes | None) -> bytes:
    """RTMR2 of a QEMU direct boot through OVMF of a Linux kernel whose EFI stub
    measures its load options and initrd (module docstring). Raises ConfigError for an
    empty command line: what OVMF and the stub measure then is not pinned down here."""
    if not cmdline:
        raise ConfigError("tdx: RTMR2 is computed for a non-empty kernel command line only")
    options = cmdline + (" initrd=initrd" if initrd else "")
    events = [hashlib.sha384((options + "\0").encode("utf-16-le")).digest()]
    if initrd:
        events.append(hashlib.sha384(initrd).digest())
    return rtmr_replay(events)


@dataclass(frozen=True)
class TdxLaunch:
    """The parts of a QEMU direct-boot TD."""

    ovmf: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    page_order: str = "per-page"
    #: The TD's memory in MiB (QEMU ``-m``): the TD HOB and the initrd's place.
    memory_mib: int | None = None
    #: QEMU's ``etc/acpi/tables`` blob for this machine shape (vCPUs, memory, devices).
    acpi_tables: Path | None = None

    def __post_init__(self) -> None:
        if self.page_order not in PAGE_ORDERS:
            raise ConfigError(f"launch: --tdx-page-order must be one of {', '.join(PAGE_ORDERS)}")
        if self.memory_mib is not None and not 64 <= self.memory_mib <= 1 << 22:
            raise ConfigError(f"launch: --memory {self.memory_mib} MiB is out of range")
        check_boot_parts(self)


def tdx_launch_registers(spec: TdxLaunch) -> dict[str, bytes]:
    """``mrtd`` always; ``rtmr2`` for a direct boot with a kernel command line;
    ``rtmr0`` with the memory size and the ACPI tables; ``rtmr1`` with the kernel and
    the memory size (``sealserve.attestation.tdx_rtmr``)."""
    from sealserve.attestation import tdx_rtmr

    firmware = _read(spec.ovmf)
    out = {"mrtd": tdx_mrtd(firmware, page_order=spec.page_order)}
    initrd = _read(spec.initrd) if spec.initrd is not None else None
    if spec.kernel is not None and spec.append:
        out["rtmr2"] = tdx_rtmr2(cmdline=spec.append, initrd=initrd)
    if spec.memory_mib is None:
        return out
    memory = spec.memory_mib << 20
    if spec.acpi_tables is not None:
        events = tdx_rtmr.rtmr0_events(firmware, memory_bytes=memory,
                                       acpi_blob=_read(spec.acpi_tables))  # fmt: skip
        out["rtmr0"] = tdx_rtmr.replay(events, 0)
    if spec.kernel is not None:
        events = tdx_rtmr.rtmr1_events(
            _read(spec.kernel), memory_bytes=memory, cmdline=spec.append or "",
            initrd_size=None if initrd is None else len(initrd),
        )  # fmt: skip
        out["rtmr1"] = tdx_rtmr.replay(events, 1)
    return out


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"launch: cannot read {str(path)[:200]!r}: {exc.strerror}") from exc
