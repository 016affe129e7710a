"""SEV-SNP (and other TEEs) through Linux configfs-tsm.

Protocol (Documentation/ABI/testing/configfs-tsm-report): ``mkdir`` an entry under
``/sys/kernel/config/tsm/report/``; write the 64-byte ``inblob``; read ``outblob``
(the report), ``auxblob`` (SNP: the cert table) and ``provider``. ``generation`` is
read before the writes and after the reads: each write bumps it by one, so any other
value means another writer raced us and the blobs may not answer our inblob; we
refuse. The entry is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealserve.attestation.claims import Platform as PlatformKind
from sealserve.enclave.platform import DEFAULT_CONFIGFS_TSM, PlatformReport
from sealserve.enclave.sev_guest import DEFAULT_DEVICE, snp_derived_key
from sealserve.errors import UnavailableError

PROVIDERS = {"sev_guest": PlatformKind.SEV_SNP, "tdx_guest": PlatformKind.TDX}


class ConfigfsTsmPlatform:
    """A TEE guest reached through configfs-tsm at ``root``.

    ``entry_name`` fixes the entry directory name (default: a fresh unique name per
    report). ``privlevel`` (SNP VMPL) is written when given. Sealing keys come from
    ``sev_guest_device`` (SNP_GET_DERIVED_KEY).
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_CONFIGFS_TSM,
        *,
        entry_name: str | None = None,
        privlevel: int | None = None,
        sev_guest_device: str | Path = DEFAULT_DEVICE,
    ) -> None:
        self.root = Path(root)
        self.entry_name = entry_name
        self.privlevel = privlevel
        self.sev_guest_device = Path(sev_guest_device)
        self._kind: PlatformKind | None = None

    @property
    def kind(self) -> PlatformKind:
        """The TEE type, from the provider of a report (SEV-SNP until one is made)."""
        return self._kind or PlatformKind.SEV_SNP

    def _read(self, entry: Path, name: str) -> bytes:
        return (entry / name).read_bytes()

    def _write(self, entry: Path, name: str, data: bytes) -> None:
        with open(entry / name, "wb", buffering=0) as fh:
            fh.write(data)

    def _generation(self, entry: Path) -> int:
        raw = self._read(entry, "generation").strip()
        try:
            return int(raw)
        except ValueError as exc:
            raise UnavailableError(f"configfs-tsm: unreadable generation {raw[:20]!r}") from exc

    def report(self, report_data: bytes) -> PlatformReport:
        """Request a report over ``report_data`` (64 bytes).

        Raises UnavailableError on I/O errors, an unknown provider, an empty outblob,
        or a generation that is not ours plus our writes.
        """
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        name = self.entry_name or f"sealserve-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        entry = self.root / name
        try:
            entry.mkdir(exist_ok=self.entry_name is not None)
            try:
                before = self._generation(entry)
                writes = 0
                if self.privlevel is not None:
                    self._write(entry, "privlevel", str(self.privlevel).encode())
                    writes += 1
                self._write(entry, "inblob", report_data)
                writes += 1
                provider = self._read(entry, "provider").decode("ascii", "replace").strip()
                outblob = self._read(entry, "outblob")
                aux_path = entry / "auxblob"
                auxblob = self._read(entry, "auxblob") if aux_path.exists() else b""
                after = self._generation(entry)
            finally:
                if self.entry_name is None:
                    # configfs removes the attributes with the entry; a plain dir may not
                    with contextlib.suppress(OSError):
                        entry.rmdir()
        except OSError as exc:
            raise UnavailableError(f"configfs-tsm: {entry}: {exc}") from exc
        # Each write bumps generation by one; anything else means another writer
        # changed the request between our write and our reads.
        if after != before + writes:
            raise UnavailableError(
                f"configfs-tsm: generation is {after}, expected {before + writes} after our "
                f"{writes} write(s) (another writer raced us); retry"
            )
        if provider not in PROVIDERS:
            raise UnavailableError(f"configfs-tsm: unknown provider {provider!r}")
        if not outblob:
            raise UnavailableError("configfs-tsm: the provider returned an empty report")
        self._kind = PROVIDERS[provider]
        return PlatformReport(self._kind, outblob, auxblob)

    def sealing_key(self, label: bytes) -> bytes:
        """HKDF-SHA256 over the SEV-SNP derived key (from ``sev_guest_device``: VCEK
        root, mixed with the guest policy and measurement) for ``label``.

        configfs-tsm itself offers no derived keys. Raises UnavailableError when the
        device is missing or the firmware refuses (or on TDX, not supported yet).
        """
        if self._kind is PlatformKind.TDX:
            raise UnavailableError("sealing keys on TDX are not supported yet")
        root = snp_derived_key(device=self.sev_guest_device, vmpl=self.privlevel or 0)
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"sealserve-snp-sealing-v1\x00" + label,
        ).derive(root)
