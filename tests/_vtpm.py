"""An Azure-like vTPM for tests: swtpm (a real TPM 2.0 implementation) on loopback,
driven by tpm2-tools, with an attestation key at 0x81000003 and a stand-in for Azure's
paravisor that answers a write to NV 0x01400002 with an HCL report (a *simulated*
SEV-SNP report, signed by the test session's simulated chain) in NV 0x01400001."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sealserve.attestation.azure_vtpm import AK_HANDLE, HCL_REPORT_INDEX, REPORT_DATA_INDEX
from sealserve.enclave.azure_vtpm import Tpm2Tools
from sealserve.enclave.simulated import SimulatedPlatform


def _free_ports() -> int:
    """A free loopback port whose successor is free too (the swtpm TCTI expects the
    control channel at port + 1)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free loopback ports")


def hcl_report(snp_report: bytes, runtime: bytes, *, pad_to: int = 0) -> bytes:
    """An HCL report around ``snp_report`` (layout: sealserve.attestation.azure_hcl)."""
    body = snp_report + struct.pack("<IIIII", 20 + len(runtime), 1, 2, 1, len(runtime)) + runtime
    size = 32 + len(body)
    out = b"HCLA" + struct.pack("<IIII", 2, size, 2, 0) + bytes(12) + body
    return out.ljust(pad_to, b"\0")


def runtime_data(ak: rsa.RSAPublicKey, user_data: bytes) -> bytes:
    """Azure's runtime data JSON: the vTPM key HCLAkPub and the guest's user-data."""
    numbers = ak.public_numbers()

    def b64(n: int) -> str:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    key = {"kid": "HCLAkPub", "key_ops": ["sign"], "kty": "RSA", "e": b64(numbers.e),
           "n": b64(numbers.n)}  # fmt: skip
    doc = {"keys": [key], "vm-configuration": {"secure-boot": True, "tpm-enabled": True},
           "user-data": user_data.hex().upper()}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def simulated_chain_pem(sim_root: Path) -> bytes:
    """The simulated VCEK, ASK and ARK as one PEM bundle (THIM's form)."""
    vcek = x509.load_der_x509_certificate((sim_root / "vcek.der").read_bytes())
    return (
        vcek.public_bytes(serialization.Encoding.PEM)
        + (sim_root / "ask.pem").read_bytes()
        + (sim_root / "ark.pem").read_bytes()
    )


class FakeParavisor:
    """A :class:`~sealserve.enclave.azure_vtpm.Vtpm` over a real TPM whose writes to
    NV 0x01400002 make a fresh HCL report in NV 0x01400001, as Azure's paravisor does.
    ``stale``: never refresh (the report keeps the previous user-data)."""

    def __init__(self, tpm: Tpm2Tools, snp: SimulatedPlatform, ak: rsa.RSAPublicKey) -> None:
        self.tpm = tpm
        self.snp = snp
        self.ak = ak
        self.stale = False

    def nv_write(self, index: int, data: bytes) -> None:
        self.tpm.nv_write(index, data)
        if index == REPORT_DATA_INDEX and not self.stale:
            self.nv_write_report(data)

    def nv_write_report(self, data: bytes) -> None:
        """Store a fresh HCL report carrying ``data`` as user-data."""
        runtime = runtime_data(self.ak, data)
        digest = hashlib.sha256(runtime).digest().ljust(64, b"\0")
        report = hcl_report(self.snp.report(digest).report, runtime, pad_to=2000)
        self.tpm.nv_write(HCL_REPORT_INDEX, report)

    def nv_read(self, index: int) -> bytes:
        return self.tpm.nv_read(index)

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, dict[int, bytes]]:
        return self.tpm.quote(nonce)


@contextmanager
def swtpm(tmp: Path) -> Iterator[tuple[Tpm2Tools, rsa.RSAPublicKey]]:
    """A started swtpm on loopback with an RSA attestation key at 0x81000003; yields the
    tpm2-tools driver and the key's public half."""
    for tool in ("swtpm", "tpm2_quote"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run scripts/test.sh (installs swtpm, tpm2-tools)")
    state = tmp / "swtpm"
    state.mkdir()
    port = _free_ports()
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        tpm = Tpm2Tools(f"swtpm:host=127.0.0.1,port={port}")
        deadline = time.monotonic() + 10
        while True:
            try:
                tpm._run("tpm2_getrandom", "8")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        ctx = tmp / "ctx"
        ctx.mkdir()
        tpm._run("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "rsa",
                 "-c", str(ctx / "primary"))  # fmt: skip
        tpm._run("tpm2_create", "-Q", "-C", str(ctx / "primary"), "-G", "rsa2048:rsassa:null",
                 "-g", "sha256", "-a",
                 "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
                 "-u", str(ctx / "ak.pub"), "-r", str(ctx / "ak.priv"))  # fmt: skip
        tpm._run("tpm2_flushcontext", "-t")
        tpm._run("tpm2_load", "-Q", "-C", str(ctx / "primary"), "-u", str(ctx / "ak.pub"),
                 "-r", str(ctx / "ak.priv"), "-c", str(ctx / "ak"))  # fmt: skip
        tpm._run("tpm2_evictcontrol", "-Q", "-C", "o", "-c", str(ctx / "ak"), hex(AK_HANDLE))
        tpm._run("tpm2_flushcontext", "-t")
        tpm._run("tpm2_readpublic", "-Q", "-c", hex(AK_HANDLE), "-f", "pem",
                 "-o", str(ctx / "ak.pem"))  # fmt: skip
        key = serialization.load_pem_public_key((ctx / "ak.pem").read_bytes())
        assert isinstance(key, rsa.RSAPublicKey)
        yield tpm, key
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class ParavisorThread:
    """The paravisor for a server in another thread or process: it watches NV
    0x01400002 on the TPM and answers each new value with a fresh HCL report."""

    def __init__(self, paravisor: FakeParavisor) -> None:
        import threading

        self.paravisor = paravisor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.answered = 0

    def _run(self) -> None:
        from sealserve.errors import UnavailableError

        last = b""
        while not self._stop.wait(0.05):
            try:
                data = self.paravisor.tpm.nv_read(REPORT_DATA_INDEX)
            except UnavailableError:
                continue  # not defined yet
            if data != last and len(data) == 64:
                self.paravisor.nv_write_report(data)
                last = data
                self.answered += 1

    def __enter__(self) -> ParavisorThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
