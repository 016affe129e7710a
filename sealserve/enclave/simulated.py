"""A simulated SEV-SNP platform: real report layout, locally generated AMD-style chain.

``SimulatedPlatform.create_root(dir)`` (run once by the operator) makes an ARK
(RSA-4096, self-signed, RSASSA-PSS SHA-384) -> ASK (RSA-4096) -> VCEK (ECDSA P-384,
with AMD's TCB, productName and hwID extensions), and a sealing secret. The verifier
checks these reports with exactly the code that checks AMD's; because the ARK is not
AMD's, the claims say ``SIMULATED_SNP`` and only a policy that explicitly trusts the
directory accepts them. The ARK's private key is discarded after use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from sealserve.attestation.claims import Platform as PlatformKind
from sealserve.attestation.snp import (
    SIGNED_SIZE,
    FirmwareVersion,
    Product,
    SigningKey,
    TcbLayout,
    TcbVersion,
    build_report,
)
from sealserve.attestation.snp_certs import ARK_GUID, ASK_GUID, VCEK_GUID, CertTable
from sealserve.enclave.platform import PlatformReport
from sealserve.errors import ConfigError

DEFAULT_MEASUREMENT = hashlib.sha384(b"sealserve simulated guest").digest()
DEFAULT_TCB = {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}
# Per simulated product line: VCEK productName and the CPUID family/model/stepping.
_PRODUCTS = {
    Product.MILAN: ("Milan-B0", (0x19, 0x01, 0x01)),
    Product.GENOA: ("Genoa-B1", (0x19, 0x11, 0x01)),
    Product.TURIN: ("Turin-C1", (0x1A, 0x02, 0x01)),
}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1."
_FILES = ("ark.pem", "ask.pem", "vcek.der", "vcek_key.pem", "sealing_secret", "platform.json")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealserve SIMULATED platform"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class SimulatedPlatform:
    """Produces SEV-SNP-layout reports signed by the simulated VCEK in ``directory``.

    ``measurement``, ``policy``, ``debug`` (sets policy bit 19), ``vmpl``,
    ``guest_svn``, ``host_data`` and ``report_version`` (2..5) describe the simulated
    guest. Raises ConfigError
    if the directory was not made by :meth:`create_root`.
    """

    kind = PlatformKind.SIMULATED_SNP

    def __init__(
        self,
        directory: str | Path,
        *,
        measurement: bytes = DEFAULT_MEASUREMENT,
        policy: int = 0x30000,
        debug: bool = False,
        vmpl: int = 0,
        guest_svn: int = 0,
        host_data: bytes = bytes(32),
        report_version: int = 3,
    ) -> None:
        self.directory = Path(directory)
        missing = [f for f in _FILES if not (self.directory / f).exists()]
        if missing:
            raise ConfigError(
                f"simulated platform: {self.directory} lacks {', '.join(missing)}",
                remedy="Create it once with SimulatedPlatform.create_root(DIR).",
            )
        if len(measurement) != 48:
            raise ConfigError("simulated platform: measurement must be 48 bytes")
        meta = json.loads((self.directory / "platform.json").read_text())
        self.product = Product(meta.get("product", Product.MILAN.value))
        self._tcb = TcbVersion.build(layout=TcbLayout.for_product(self.product), **meta["tcb"])
        self._chip_id = bytes.fromhex(meta["chip_id"])
        key = serialization.load_pem_private_key(
            (self.directory / "vcek_key.pem").read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("simulated platform: vcek_key.pem is not an EC key")
        self._key = key
        self._secret = (self.directory / "sealing_secret").read_bytes()
        self._certs = CertTable.build(
            {
                VCEK_GUID: (self.directory / "vcek.der").read_bytes(),
                ASK_GUID: _pem_to_der((self.directory / "ask.pem").read_bytes()),
                ARK_GUID: _pem_to_der((self.directory / "ark.pem").read_bytes()),
            }
        ).to_bytes()
        self.measurement = measurement
        self.policy = policy | (1 << 19) if debug else policy & ~(1 << 19)
        self.vmpl = vmpl
        self.guest_svn = guest_svn
        self.host_data = host_data
        self.report_version = report_version

    @classmethod
    def create_root(
        cls,
        directory: str | Path,
        *,
        tcb: dict[str, int] | None = None,
        product: Product = Product.MILAN,
        years: int = 7,
    ) -> Path:
        """Generate the simulated ARK -> ASK -> VCEK chain and sealing secret in
        ``directory`` (created; must be empty). Returns the directory. The directory
        doubles as ``TrustedRoots.from_dir`` input (``ark.pem``, ``ask.pem``).

        Raises ConfigError if the directory already holds a platform.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if any((path / f).exists() for f in _FILES):
            raise ConfigError(f"simulated platform: {path} already holds a platform")
        tcb = dict(tcb or DEFAULT_TCB)
        if product is Product.TURIN:
            tcb.setdefault("fmc", 0)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        until = now + dt.timedelta(days=365 * years)
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        chip_id = secrets.token_bytes(64)

        def ca(
            subject: str, key: rsa.RSAPrivateKey, issuer: str, path_len: int | None
        ) -> x509.Certificate:
            return (
                x509.CertificateBuilder()
                .subject_name(_name(subject))
                .issuer_name(_name(issuer))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
                .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)
            )

        ark = ca("ARK-SIMULATED", ark_key, "ARK-SIMULATED", None)
        ask = ca("SEV-SIMULATED", ask_key, "ARK-SIMULATED", 0)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK-SIMULATED"))
            .issuer_name(ask.subject)
            .public_key(vcek_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
        )
        amd_ext = {
            "2": b"\x16" + bytes([len(_PRODUCTS[product][0])]) + _PRODUCTS[product][0].encode(),
            "3.1": _der_int(tcb["bl"]),
            "3.2": _der_int(tcb["tee"]),
            "3.3": _der_int(tcb["snp"]),
            "3.8": _der_int(tcb["ucode"]),
            "4": chip_id,
        }
        if "fmc" in tcb:
            amd_ext["3.9"] = _der_int(tcb["fmc"])
        for oid, value in amd_ext.items():
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(_AMD + oid), value)
            builder = builder.add_extension(ext, critical=False)
        vcek = builder.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS)
        pem = serialization.Encoding.PEM
        (path / "ark.pem").write_bytes(ark.public_bytes(pem))
        (path / "ask.pem").write_bytes(ask.public_bytes(pem))
        (path / "vcek.der").write_bytes(vcek.public_bytes(serialization.Encoding.DER))
        _write_private(
            path / "vcek_key.pem",
            vcek_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _write_private(path / "sealing_secret", secrets.token_bytes(32))
        meta = {
            "format": 1,
            "simulated": True,
            "product": product.value,
            "tcb": tcb,
            "chip_id": chip_id.hex(),
        }
        (path / "platform.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    def report(self, report_data: bytes) -> PlatformReport:
        """A signed SEV-SNP-layout report (version 3, the product's CPUID) over
        ``report_data``."""
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        unsigned = build_report(
            version=self.report_version,
            guest_svn=self.guest_svn,
            policy=self.policy,
            vmpl=self.vmpl,
            current_tcb=self._tcb,
            platform_info=0x1,
            signing_key=SigningKey.VCEK,
            report_data=report_data,
            measurement=self.measurement,
            host_data=self.host_data,
            chip_id=self._chip_id,
            cpuid=_PRODUCTS[self.product][1],
            current=FirmwareVersion(1, 55, 0),
            report_id=secrets.token_bytes(32),
        )
        signed = unsigned[:SIGNED_SIZE]
        r, s = decode_dss_signature(self._key.sign(signed, ec.ECDSA(hashes.SHA384())))
        sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
        raw = signed + sig + unsigned[SIGNED_SIZE + len(sig) :]
        return PlatformReport(self.kind, raw, self._certs)

    def sealing_key(self, label: bytes) -> bytes:
        """HKDF-SHA256 of the directory's secret, salted with the measurement: a guest
        with another measurement derives another key."""
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.measurement,
            info=b"sealserve-simulated-sealing-v1\x00" + label,
        ).derive(self._secret)


def _pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
