"""The SEV-SNP attestation report (AMD SEV-SNP Firmware ABI, "ATTESTATION_REPORT").

Over 400 lines: the report layout is one spec table, parsed field by field.

A report is 1184 (0x4A0) bytes, little-endian. Versions 2 to 5 are understood:
version 3 adds the CPUID family/model/stepping of the chip, version 5 the launch and
current mitigation vectors. The ECDSA P-384 signature at 0x2A0 covers 0x000..0x29F.

The TCB_VERSION encoding depends on the product line: Milan and Genoa use
``bl, tee, reserved[4], snp, ucode``; Turin uses ``fmc, bl, tee, snp, reserved[3],
ucode``. The layout is picked from the report's CPUID (version 3+) or given by the
caller; nothing here assumes Milan.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from sealserve.errors import EvidenceFormatError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_OFFSET = 0x2A0
SIG_COMPONENT_SIZE = 72
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
SIG_ALGO_ECDSA_P384_SHA384 = 1


class Product(enum.StrEnum):
    """AMD EPYC product lines with SEV-SNP (KDS names)."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """Product line from CPUID family/model, ``None`` when unknown."""
        if family == 0x19 and model < 0x10:
            return cls.MILAN
        if family == 0x19 and (0x10 <= model < 0x20 or 0xA0 <= model < 0xB0):
            return cls.GENOA  # Genoa, Bergamo and Siena share Genoa's KDS line
        if family == 0x1A and model < 0x20:
            return cls.TURIN
        return None

    @classmethod
    def from_name(cls, name: str) -> Product | None:
        """Product from a VCEK productName extension such as ``"Milan-B0"``."""
        base = name.split("-", 1)[0]
        for product in cls:
            if product.value.lower() == base.lower():
                return product
        return None


class TcbLayout(enum.StrEnum):
    """How the 8 bytes of a TCB_VERSION are laid out."""

    MILAN_GENOA = "milan-genoa"
    TURIN = "turin"

    @classmethod
    def for_product(cls, product: Product | None) -> TcbLayout:
        return cls.TURIN if product is Product.TURIN else cls.MILAN_GENOA


@dataclass(frozen=True)
class TcbVersion:
    """One TCB_VERSION: security patch levels of the firmware components."""

    raw: bytes
    layout: TcbLayout
    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None

    @classmethod
    def from_bytes(cls, raw: bytes, layout: TcbLayout) -> TcbVersion:
        """Decode 8 bytes. Raises EvidenceFormatError on a wrong length."""
        if len(raw) != 8:
            raise EvidenceFormatError(
                f"tcb: a TCB_VERSION is 8 bytes, got {len(raw)}", check="report_format"
            )
        if layout is TcbLayout.TURIN:
            return cls(
                bytes(raw), layout, bl=raw[1], tee=raw[2], snp=raw[3], ucode=raw[7], fmc=raw[0]
            )
        return cls(bytes(raw), layout, bl=raw[0], tee=raw[1], snp=raw[6], ucode=raw[7])

    @classmethod
    def build(
        cls, *, layout: TcbLayout, bl: int, tee: int, snp: int, ucode: int, fmc: int | None = None
    ) -> TcbVersion:
        """Encode components into a TCB_VERSION (for producers and tests)."""
        if layout is TcbLayout.TURIN:
            raw = bytes([fmc or 0, bl, tee, snp, 0, 0, 0, ucode])
        else:
            raw = bytes([bl, tee, 0, 0, 0, 0, snp, ucode])
        return cls.from_bytes(raw, layout)

    def components(self) -> dict[str, int]:
        """Component name -> SPL; ``fmc`` only for layouts that have it."""
        out = {"bl": self.bl, "tee": self.tee, "snp": self.snp, "ucode": self.ucode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.components(), "raw": self.raw.hex()}


class SigningKey(enum.StrEnum):
    """Which key signed the report (bits 2..4 of the 0x48 flags word)."""

    VCEK = "VCEK"
    VLEK = "VLEK"
    NONE = "NONE"


_SIGNING_KEYS = {0: SigningKey.VCEK, 1: SigningKey.VLEK, 7: SigningKey.NONE}

# Guest policy bits 16 and up (ABI spec, "GUEST_POLICY"). Bits 0..15 are the ABI version.
POLICY_BITS: dict[int, str] = {
    16: "SMT",
    17: "RESERVED_1",
    18: "MIGRATE_MA",
    19: "DEBUG",
    20: "SINGLE_SOCKET",
    21: "CXL_ALLOW",
    22: "MEM_AES_256_XTS",
    23: "RAPL_DIS",
    24: "CIPHERTEXT_HIDING",
    25: "PAGE_SWAP_DISABLE",
}

PLATFORM_INFO_BITS: dict[int, str] = {
    0: "SMT_EN",
    1: "TSME_EN",
    2: "ECC_EN",
    3: "RAPL_DIS",
    4: "CIPHERTEXT_HIDING_EN",
    5: "ALIAS_CHECK_COMPLETE",
    7: "TIO_EN",
}


def _bit_names(value: int, names: dict[int, str], start: int) -> tuple[str, ...]:
    out = []
    for bit in range(start, 64):
        if value >> bit & 1:
            out.append(names.get(bit, f"BIT_{bit}"))
    return tuple(out)


@dataclass(frozen=True)
class GuestPolicy:
    """The 64-bit guest policy the guest owner launched with, decoded."""

    value: int

    def _bit(self, n: int) -> bool:
        return bool(self.value >> n & 1)

    @property
    def abi_minor(self) -> int:
        return self.value & 0xFF

    @property
    def abi_major(self) -> int:
        return self.value >> 8 & 0xFF

    @property
    def smt(self) -> bool:
        return self._bit(16)

    @property
    def migrate_ma(self) -> bool:
        return self._bit(18)

    @property
    def debug(self) -> bool:
        return self._bit(19)

    @property
    def single_socket(self) -> bool:
        return self._bit(20)

    @property
    def cxl_allow(self) -> bool:
        return self._bit(21)

    @property
    def mem_aes_256_xts(self) -> bool:
        return self._bit(22)

    @property
    def rapl_dis(self) -> bool:
        return self._bit(23)

    @property
    def ciphertext_hiding(self) -> bool:
        return self._bit(24)

    @property
    def page_swap_disable(self) -> bool:
        return self._bit(25)

    @property
    def flags(self) -> tuple[str, ...]:
        return _bit_names(self.value, POLICY_BITS, 16)


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True)
class SnpReport:
    """A parsed SEV-SNP attestation report. Build it with :meth:`from_bytes`."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current: FirmwareVersion
    committed: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes  # 72 bytes, little-endian, as in the report
    signature_s: bytes
    product: Product | None

    @classmethod
    def from_bytes(cls, data: bytes, *, product: Product | None = None) -> SnpReport:
        """Parse a report.

        ``product`` selects the TCB layout when the report does not carry CPUID
        (version 2); with version 3+ the CPUID decides, and a conflicting ``product``
        is refused.

        Raises EvidenceFormatError (``check`` = ``"report_size"``, ``"report_version"``,
        ``"signature_algo"``, ``"signing_key"`` or ``"report_product"``).
        """
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise EvidenceFormatError(
                f"report_size: an SEV-SNP report is {REPORT_SIZE} bytes, got {len(data)}",
                check="report_size",
            )
        version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x00)
        if version not in SUPPORTED_VERSIONS:
            raise EvidenceFormatError(
                f"report_version: unknown SEV-SNP report version {version} "
                f"(supported: {sorted(SUPPORTED_VERSIONS)})",
                check="report_version",
            )
        vmpl, sig_algo = struct.unpack_from("<II", data, 0x30)
        if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise EvidenceFormatError(
                f"signature_algo: unknown signature algorithm {sig_algo} "
                "(only 1 = ECDSA P-384 with SHA-384 is defined)",
                check="signature_algo",
            )
        (platform_info,) = struct.unpack_from("<Q", data, 0x40)
        (key_flags,) = struct.unpack_from("<I", data, 0x48)
        key_sel = key_flags >> 2 & 0x7
        if key_sel not in _SIGNING_KEYS:
            raise EvidenceFormatError(
                f"signing_key: reserved SIGNING_KEY value {key_sel} in the report",
                check="signing_key",
            )
        cpuid: tuple[int, int, int] | None = None
        if version >= 3:
            cpuid = (data[0x188], data[0x189], data[0x18A])
            from_cpuid = Product.from_cpuid(cpuid[0], cpuid[1])
            if product is not None and from_cpuid is not None and from_cpuid is not product:
                raise EvidenceFormatError(
                    f"report_product: the report's CPUID says {from_cpuid.value}, "
                    f"not {product.value}",
                    check="report_product",
                )
            product = product or from_cpuid
        layout = TcbLayout.for_product(product)
        mit: tuple[int, int] | None = None
        if version >= 5:
            mit = struct.unpack_from("<QQ", data, 0x1F8)

        def tcb(off: int) -> TcbVersion:
            return TcbVersion.from_bytes(data[off : off + 8], layout)

        return cls(
            raw=data,
            version=version,
            guest_svn=guest_svn,
            policy=GuestPolicy(policy),
            family_id=data[0x10:0x20],
            image_id=data[0x20:0x30],
            vmpl=vmpl,
            signature_algo=sig_algo,
            current_tcb=tcb(0x38),
            platform_info=platform_info,
            author_key_en=bool(key_flags & 1),
            mask_chip_key=bool(key_flags >> 1 & 1),
            signing_key=_SIGNING_KEYS[key_sel],
            report_data=data[0x50:0x90],
            measurement=data[0x90:0xC0],
            host_data=data[0xC0:0xE0],
            id_key_digest=data[0xE0:0x110],
            author_key_digest=data[0x110:0x140],
            report_id=data[0x140:0x160],
            report_id_ma=data[0x160:0x180],
            reported_tcb=tcb(0x180),
            cpuid_fam_id=cpuid[0] if cpuid else None,
            cpuid_mod_id=cpuid[1] if cpuid else None,
            cpuid_step=cpuid[2] if cpuid else None,
            chip_id=data[0x1A0:0x1E0],
            committed_tcb=tcb(0x1E0),
            current=FirmwareVersion(major=data[0x1EA], minor=data[0x1E9], build=data[0x1E8]),
            committed=FirmwareVersion(major=data[0x1EE], minor=data[0x1ED], build=data[0x1EC]),
            launch_tcb=tcb(0x1F0),
            launch_mit_vector=mit[0] if mit else None,
            current_mit_vector=mit[1] if mit else None,
            signature_r=data[0x2A0:0x2E8],
            signature_s=data[0x2E8:0x330],
            product=product,
        )

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (0x000..0x29F)."""
        return self.raw[:SIGNED_SIZE]

    @property
    def debug(self) -> bool:
        return self.policy.debug

    def fields(self) -> dict[str, Any]:
        """Every decoded field, JSON-friendly (bytes as lowercase hex)."""
        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": hex(self.policy.value),
            "policy_abi": f"{self.policy.abi_major}.{self.policy.abi_minor}",
            "policy_debug": self.policy.debug,
            "policy_flags": list(self.policy.flags),
            "policy_smt": self.policy.smt,
            "policy_migrate_ma": self.policy.migrate_ma,
            "policy_single_socket": self.policy.single_socket,
            "policy_cxl_allow": self.policy.cxl_allow,
            "policy_mem_aes_256_xts": self.policy.mem_aes_256_xts,
            "policy_rapl_dis": self.policy.rapl_dis,
            "policy_ciphertext_hiding": self.policy.ciphertext_hiding,
            "policy_page_swap_disable": self.policy.page_swap_disable,
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": self.current_tcb.to_json(),
            "platform_info": hex(self.platform_info),
            "platform_info_flags": list(_bit_names(self.platform_info, PLATFORM_INFO_BITS, 0)),
            "author_key_en": int(self.author_key_en),
            "mask_chip_key": int(self.mask_chip_key),
            "signing_key": self.signing_key.value,
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": self.reported_tcb.to_json(),
            "chip_id": self.chip_id.hex(),
            "committed_tcb": self.committed_tcb.to_json(),
            "current_fw": str(self.current),
            "committed_fw": str(self.committed),
            "launch_tcb": self.launch_tcb.to_json(),
            "tcb_layout": self.reported_tcb.layout.value,
        }
        if self.cpuid_fam_id is not None:
            out["cpuid_fam_mod_step"] = (
                f"{self.cpuid_fam_id:02x}/{self.cpuid_mod_id:02x}/{self.cpuid_step:02x}"
            )
        if self.launch_mit_vector is not None:
            out["launch_mit_vector"] = hex(self.launch_mit_vector)
            out["current_mit_vector"] = hex(self.current_mit_vector or 0)
        if self.product is not None:
            out["product"] = self.product.value
        return out


def build_report(
    *,
    version: int = 3,
    guest_svn: int = 0,
    policy: int = 0x30000,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    vmpl: int = 0,
    current_tcb: TcbVersion,
    platform_info: int = 0,
    signing_key: SigningKey = SigningKey.VCEK,
    report_data: bytes = bytes(64),
    measurement: bytes = bytes(48),
    host_data: bytes = bytes(32),
    reported_tcb: TcbVersion | None = None,
    cpuid: tuple[int, int, int] = (0x19, 0x01, 0x01),
    chip_id: bytes = bytes(64),
    committed_tcb: TcbVersion | None = None,
    current: FirmwareVersion = FirmwareVersion(1, 55, 0),
    launch_tcb: TcbVersion | None = None,
    report_id: bytes = bytes(32),
) -> bytes:
    """Lay out an unsigned report (signature area zero) in the SEV-SNP format.

    Used by the simulated platform; the caller signs ``result[:0x2A0]``.
    Raises ValueError on wrong field lengths.
    """
    lengths = {
        "family_id": (family_id, 16),
        "image_id": (image_id, 16),
        "report_data": (report_data, 64),
        "measurement": (measurement, 48),
        "host_data": (host_data, 32),
        "chip_id": (chip_id, 64),
        "report_id": (report_id, 32),
    }
    for name, (value, size) in lengths.items():
        if len(value) != size:
            raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    key_sel = {v: k for k, v in _SIGNING_KEYS.items()}[signing_key]
    buf = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", buf, 0x00, version, guest_svn, policy)
    buf[0x10:0x20] = family_id
    buf[0x20:0x30] = image_id
    struct.pack_into("<II", buf, 0x30, vmpl, SIG_ALGO_ECDSA_P384_SHA384)
    buf[0x38:0x40] = current_tcb.raw
    struct.pack_into("<QI", buf, 0x40, platform_info, key_sel << 2)
    buf[0x50:0x90] = report_data
    buf[0x90:0xC0] = measurement
    buf[0xC0:0xE0] = host_data
    buf[0x140:0x160] = report_id
    buf[0x160:0x180] = b"\xff" * 32  # no migration agent
    buf[0x180:0x188] = (reported_tcb or current_tcb).raw
    if version >= 3:
        buf[0x188:0x18B] = bytes(cpuid)
    buf[0x1A0:0x1E0] = chip_id
    buf[0x1E0:0x1E8] = (committed_tcb or current_tcb).raw
    buf[0x1E8:0x1EB] = bytes([current.build, current.minor, current.major])
    buf[0x1EC:0x1EF] = bytes([current.build, current.minor, current.major])
    buf[0x1F0:0x1F8] = (launch_tcb or current_tcb).raw
    return bytes(buf)
