"""The broker's TLS identity: the operator's lasting key and certificate, or, for
development, one made in memory at every start.

Servers waiting for a model key pin the broker's certificate (their ``[key_broker]
ca_file``). An identity made in memory changes at every restart, so a restart would
leave them pinning a certificate that no longer exists: production brokers load
``tls_cert_file`` / ``tls_key_file`` (``sealserve broker init-tls`` makes a pair), and
the in-memory default says so in a warning at start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import ConfigError

log = logging.getLogger("sealserve.broker")

COMMON_NAME = "sealserve key broker"
KEY_NAME = "broker-key.pem"
CERT_NAME = "broker-cert.pem"
EPHEMERAL_WARNING = (
    "the broker's TLS certificate is made in memory and changes at every restart: "
    "servers waiting for a key then fail to verify it until their [key_broker] ca_file "
    "holds the new one; give the broker a lasting identity (tls_cert_file and "
    "tls_key_file, made by `sealserve broker init-tls --out DIR`)"
)


def load_identity(cert_file: Path, key_file: Path) -> TlsIdentity:
    """The operator's key and certificate, read into memory. Raises ConfigError when a
    file cannot be read, the key is readable by every user, or the two do not match."""
    try:
        mode = stat.S_IMODE(os.stat(key_file).st_mode)
    except OSError as exc:
        raise ConfigError(f"tls_key_file {key_file}: cannot read: {exc.strerror}") from exc
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"tls_key_file {key_file} is readable by every user (mode {mode:04o})",
            remedy=f"chmod 600 {key_file} (0640 for a service group), and replace the key "
            "if others may have read it.",
        )
    ident = TlsIdentity.from_files(cert_file, key_file)
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    key = serialization.load_pem_private_key(ident.key_pem, password=None)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, raw
    ) != key.public_key().public_bytes(serialization.Encoding.DER, raw):
        raise ConfigError(f"tls_cert_file {cert_file} is not the certificate of {key_file}")
    return ident


def ephemeral_identity(hostnames: tuple[str, ...]) -> TlsIdentity:
    """A fresh in-memory identity for ``hostnames``; warns that restarts break pins."""
    log.warning(EPHEMERAL_WARNING, extra={"event": "broker_ephemeral_tls"})
    return TlsIdentity.generate(hostnames=hostnames, common_name=COMMON_NAME)


def init_identity(out: Path, *, hostnames: tuple[str, ...], days: int) -> tuple[Path, Path]:
    """Write a new key (``broker-key.pem``, mode 0600) and its self-signed certificate
    (``broker-cert.pem``) into ``out``; never overwrites. Returns (cert, key) paths.
    Raises ConfigError."""
    ident = TlsIdentity.generate(hostnames=hostnames, common_name=COMMON_NAME, valid_days=days)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}") from exc
    cert, key = out / CERT_NAME, out / KEY_NAME
    for path, data, mode in ((key, ident.key_pem, 0o600), (cert, ident.cert_pem, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return cert, key
