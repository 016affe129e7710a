"""A small, deterministic stand-in for a Linux bzImage with an EFI stub: a PE32+ image
whose file also carries the x86 boot protocol's setup header, laid out as a real
kernel's (PE headers between 0x40 and 0x1f1, the setup header at 0x1f1 inside the
``.setup`` section). Enough for OVMF's Authenticode measurement and QEMU's setup-header
patch; it does not boot."""

from __future__ import annotations

import struct


def _noise(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 17 + (i >> 7)) % 251 for i in range(n))


def synthetic_bzimage(*, protocol: int = 0x020F, xloadflags: int = 0x0003,
                      trailing: int = 16, certificate: bytes = b"") -> bytes:  # fmt: skip
    """The image: ``.setup`` (0x200..0x600), ``.text`` and ``.data`` sections, then
    ``trailing`` bytes after the last section and an optional certificate table."""
    sections = [(b".setup", 0x200, 0x400), (b".text", 0x600, 0x1800), (b".data", 0x1E00, 0x600)]
    end = 0x2400
    image = bytearray(end + trailing)
    image[0:2] = b"MZ"
    struct.pack_into("<I", image, 0x3C, 0x40)
    image[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", image, 0x44, 0x8664, len(sections), 0, 0, 0, 240, 0x0206)
    opt = 0x58
    struct.pack_into("<HBB", image, opt, 0x20B, 2, 20)  # PE32+, linker version
    struct.pack_into("<I", image, opt + 16, 0x600)  # AddressOfEntryPoint
    struct.pack_into("<I", image, opt + 32, 0x200)  # SectionAlignment
    struct.pack_into("<I", image, opt + 36, 0x200)  # FileAlignment
    struct.pack_into("<I", image, opt + 56, end)  # SizeOfImage
    struct.pack_into("<I", image, opt + 60, 0x200)  # SizeOfHeaders
    struct.pack_into("<I", image, opt + 64, 0x12345678)  # CheckSum (not hashed)
    struct.pack_into("<H", image, opt + 68, 10)  # Subsystem: EFI application
    struct.pack_into("<I", image, opt + 108, 16)  # NumberOfRvaAndSizes
    table = opt + 240
    for i, (name, pointer, size) in enumerate(sections):
        struct.pack_into("<8sIIII", image, table + 40 * i, name, size, pointer, size, pointer)
        image[pointer : pointer + size] = _noise(size, i + 1)
    image[end:] = _noise(trailing, 9)
    # The boot protocol's setup header (arch/x86/boot/header.S).
    image[0x1F1] = 7  # setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, protocol)
    image[0x210] = 0  # type_of_loader
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<IIH", image, 0x218, 0, 0, 0)  # ramdisk_image, ramdisk_size
    struct.pack_into("<H", image, 0x224, 0)  # heap_end_ptr
    struct.pack_into("<I", image, 0x228, 0)  # cmd_line_ptr
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<H", image, 0x236, xloadflags)
    if certificate:
        cert_at = len(image)
        image += certificate
        struct.pack_into("<II", image, opt + 112 + 4 * 8, cert_at, len(certificate))
    return bytes(image)
