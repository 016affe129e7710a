"""The ``azure-vtpm`` platform: evidence from an Azure confidential VM's vTPM.

See :mod:`sealserve.attestation.azure_vtpm` for what the evidence is and how it is
verified. Producing it, for one REPORT_DATA:

1 write it to NV index 0x01400002 (defined, 64 bytes, when missing); 2 read NV index
0x01400001 until the paravisor's fresh HCL report carries it as ``user-data`` (a
stale report is never used: it would answer another nonce); 3 quote the SHA-256 PCRs
0-23 with the vTPM attestation key (0x81000003) over SHA-256(REPORT_DATA), and read
them. The TPM is driven through tpm2-tools (``tpm2_nvwrite``, ``tpm2_quote`` ...; the
Debian/Ubuntu package ``tpm2-tools``), with ``TPM2TOOLS_TCTI`` set to ``tcti``
(default: the kernel's resource manager, ``device:/dev/tpmrm0``). One report at a time,
across worker processes too (``flock`` on ``lock_file``).

The VCEK chain comes from Azure's instance metadata (``THIM_URL``) or a file, once at
start. Sealing keys are not offered (the guest has no SNP derived key under the
paravisor): keep ``defense.state_dir`` unset, as on TDX.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from sealserve.attestation.azure_hcl import HclReport
from sealserve.attestation.azure_vtpm import (
    AK_HANDLE,
    HCL_REPORT_INDEX,
    REPORT_DATA_INDEX,
    VtpmBundle,
    quote_nonce,
    user_data,
)
from sealserve.attestation.claims import Platform as PlatformKind
from sealserve.attestation.tpm_quote import PCR_COUNT
from sealserve.enclave.platform import PlatformReport
from sealserve.errors import AttestationError, UnavailableError

DEFAULT_TCTI = "device:/dev/tpmrm0"
# Azure Instance Metadata Service: the VM's VCEK and its ASK/ARK chain (THIM).
THIM_URL = "http://169.254.169.254/metadata/THIM/amd/certification"
_PCRS = "sha256:" + ",".join(str(i) for i in range(PCR_COUNT))


class Vtpm(Protocol):
    """The vTPM operations the platform needs."""

    def nv_write(self, index: int, data: bytes) -> None: ...

    def nv_read(self, index: int) -> bytes: ...

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, dict[int, bytes]]:
        """(TPMS_ATTEST, RSA signature, SHA-256 PCRs 0-23) answering ``nonce``."""
        ...


class Tpm2Tools:
    """:class:`Vtpm` through the tpm2-tools commands. Raises UnavailableError when a
    command is missing, fails or times out."""

    def __init__(self, tcti: str | None = None, *, timeout_s: float = 20.0) -> None:
        self.tcti = tcti or DEFAULT_TCTI
        self.timeout_s = timeout_s

    def _run(self, *args: str, stdin: bytes | None = None) -> bytes:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            done = subprocess.run(
                args, input=stdin, capture_output=True, env=env, timeout=self.timeout_s,
                check=False,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise UnavailableError(
                f"azure-vtpm: {args[0]} not found",
                remedy="Install tpm2-tools (apt install tpm2-tools) in the VM image.",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise UnavailableError(f"azure-vtpm: {args[0]} timed out") from exc
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise UnavailableError(
                f"azure-vtpm: {args[0]} failed ({done.returncode}): {(why or [''])[-1][:200]}"
            )
        return done.stdout

    def _size(self, index: int) -> int | None:
        try:
            out = self._run("tpm2_nvreadpublic", hex(index))
        except UnavailableError:
            return None
        for line in out.decode("utf-8", "replace").splitlines():
            if line.strip().startswith("size:"):
                return int(line.split(":", 1)[1])
        return None

    def nv_write(self, index: int, data: bytes) -> None:
        size = self._size(index)
        if size is not None and size != len(data):
            self._run("tpm2_nvundefine", hex(index), "-C", "o")
        if size != len(data):
            self._run(
                "tpm2_nvdefine", hex(index), "-C", "o", "-s", str(len(data)),
                "-a", "ownerread|ownerwrite|authread|authwrite",
            )  # fmt: skip
        self._run("tpm2_nvwrite", hex(index), "-C", "o", "-i", "-", stdin=data)

    def nv_read(self, index: int) -> bytes:
        return self._run("tpm2_nvread", hex(index), "-C", "o")

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, dict[int, bytes]]:
        with tempfile.TemporaryDirectory(prefix="sealserve-quote-") as tmp:
            d = Path(tmp)
            self._run(
                "tpm2_quote", "-c", hex(AK_HANDLE), "-l", _PCRS, "-q", nonce.hex(),
                "-g", "sha256", "-m", str(d / "msg"), "-s", str(d / "sig"), "-f", "plain",
                "-o", str(d / "pcrs"), "-F", "values",
            )  # fmt: skip
            values = (d / "pcrs").read_bytes()
            if len(values) != 32 * PCR_COUNT:
                raise UnavailableError(f"azure-vtpm: tpm2_quote wrote {len(values)} PCR bytes")
            pcrs = {i: values[32 * i : 32 * i + 32] for i in range(PCR_COUNT)}
            return (d / "msg").read_bytes(), (d / "sig").read_bytes(), pcrs


def fetch_vcek_chain(url: str = THIM_URL, *, timeout_s: float = 5.0) -> bytes:
    """The VCEK and its chain (PEM) from Azure's instance metadata. Raises
    UnavailableError."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("the THIM URL must be http(s)")
    request = urllib.request.Request(url, headers={"Metadata": "true"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            doc = json.loads(response.read(1 << 20))
        chain = (str(doc["vcekCert"]) + "\n" + str(doc.get("certificateChain", ""))).encode(
            "ascii"
        )
    except (OSError, ValueError, KeyError, TypeError, UnicodeEncodeError) as exc:
        raise UnavailableError(
            f"azure-vtpm: no VCEK chain from {url} ({type(exc).__name__})",
            remedy="Run on an Azure confidential VM, or set azure_vcek_chain to a PEM file "
            "holding the VM's VCEK, ASK and ARK.",
        ) from exc
    return chain


class AzureVtpmPlatform:
    """An Azure SEV-SNP confidential VM reached through its vTPM (``vtpm``).

    ``vcek_chain``: the VM's VCEK (and ASK, ARK) as PEM. ``refresh_timeout_s``: how
    long to wait for the paravisor to store a report carrying our REPORT_DATA.
    """

    kind = PlatformKind.AZURE_VTPM

    def __init__(
        self,
        vtpm: Vtpm,
        *,
        vcek_chain: bytes,
        refresh_timeout_s: float = 10.0,
        poll_s: float = 0.1,
        sleep: Callable[[float], None] = time.sleep,
        lock_file: str | Path | None = None,
    ) -> None:
        self.vtpm = vtpm
        self.lock_file = Path(lock_file or Path(tempfile.gettempdir()) / "sealserve-vtpm.lock")
        self.vcek_chain = vcek_chain
        self.refresh_timeout_s = refresh_timeout_s
        self.poll_s = poll_s
        self._sleep = sleep
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One report at a time across threads and worker processes (the NV index is
        shared: another request's write would replace our REPORT_DATA)."""
        with self._lock:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise UnavailableError(f"azure-vtpm: lock {self.lock_file}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _fresh_hcl_report(self, report_data: bytes) -> bytes:
        self.vtpm.nv_write(REPORT_DATA_INDEX, report_data)
        deadline = time.monotonic() + self.refresh_timeout_s
        why = "it still carries another REPORT_DATA"
        while True:
            try:
                raw = self.vtpm.nv_read(HCL_REPORT_INDEX)
                if user_data(HclReport.from_bytes(raw)) == report_data:
                    return raw
            except (AttestationError, UnavailableError) as exc:
                why = exc.message  # not (yet) a report carrying our data
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"azure-vtpm: the HCL report in NV {HCL_REPORT_INDEX:#x} did not carry "
                    f"our REPORT_DATA within {self.refresh_timeout_s:g} s ({why[:200]})"
                )
            self._sleep(self.poll_s)

    def report(self, report_data: bytes) -> PlatformReport:
        """The HCL report answering ``report_data`` and the quote bundle. Raises
        UnavailableError."""
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        with self._exclusive():
            hcl = self._fresh_hcl_report(report_data)
            message, signature, pcrs = self.vtpm.quote(quote_nonce(report_data))
        bundle = VtpmBundle(message, signature, pcrs, self.vcek_chain)
        return PlatformReport(self.kind, hcl, bundle.to_bytes())

    def sealing_key(self, label: bytes) -> bytes:
        raise UnavailableError(
            "sealing keys on azure-vtpm are not supported yet",
            remedy="Leave defense.state_dir unset (defense secrets live in memory).",
        )
