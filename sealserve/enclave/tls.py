"""TLS credentials of the server and the key broker: from files, or an in-memory key
made at start.

The in-memory key never touches disk. Clients pin its certificate — through
attestation evidence that binds its public key, or out of band for local tools.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealserve.errors import ConfigError


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate chain and key, PEM encoded. ``ephemeral`` if made in memory."""

    cert_pem: bytes
    key_pem: bytes
    ephemeral: bool

    @property
    def spki_der(self) -> bytes:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> TlsIdentity:
        try:
            cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc
        try:
            x509.load_pem_x509_certificate(cert_pem)
            serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise ConfigError(
                f"TLS files {cert} / {key} are not a PEM certificate and key"
            ) from exc
        return cls(cert_pem=cert_pem, key_pem=key_pem, ephemeral=False)

    @classmethod
    def generate(
        cls,
        *,
        hostnames: tuple[str, ...] = ("localhost",),
        common_name: str = "sealserve",
        valid_days: int = 30,
    ) -> TlsIdentity:
        """A fresh P-256 key and self-signed certificate valid for ``hostnames`` during
        ``valid_days``."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        import ipaddress

        sans: list[x509.GeneralName] = []
        for h in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ephemeral=True,
        )
