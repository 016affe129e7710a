"""Encrypted models on the server side: where their keys come from, and their source.

A version directory holds ``model.sealed`` (sealserve's encrypted model format) instead
of ``model.onnx``. Its data key comes from the key broker, released only to this
server's attestation evidence, or, for development, from a key file the model's
``config.toml`` names (``[encryption] key_file``). The plaintext exists only in this
process's memory: it is decrypted into a buffer and handed to onnxruntime as bytes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from sealserve.enclave.key_file import KeyFile
from sealserve.enclave.model_file import decrypt_to_bytes, read_header
from sealserve.enclave.platform import Platform
from sealserve.errors import ConfigError, CryptoError, KeyReleaseError

log = logging.getLogger("sealserve.keys")


class KeyBrokerSettings(BaseModel):
    """Where encrypted models' keys are released from ([key_broker])."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="The key broker's HOST:PORT.")
    ca_file: Path | None = Field(
        default=None, description="PEM certificate (or CA) that the broker's TLS must match."
    )
    server_name: str | None = Field(default=None, description="Name to check in its cert.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    retries: int = Field(default=6, ge=0, le=50, description="Attempts while unreachable.")


@dataclass(frozen=True)
class KeyRelease:
    """What this server's evidence publishes, for the broker to release keys to it."""

    platform: Platform
    tls_spki: bytes
    manifest: bytes
    hpke_private_key: X25519PrivateKey = field(repr=False)


@dataclass
class KeyProvider:
    """Data keys by key id: from key files, or released by the broker after attestation
    (``release``: None when this server has no attestation, then only key files work)."""

    broker: KeyBrokerSettings | None = None
    release: KeyRelease | None = None
    _keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, key_id: str, *, key_file: Path | None = None) -> bytes:
        """The data key for ``key_id``, from ``key_file`` when the model's config names
        one, else from the broker. Raises KeyReleaseError or ConfigError."""
        with self._lock:
            if key_id in self._keys:
                return self._keys[key_id]
            if key_file is not None:
                held = KeyFile.read(key_file)
                if held.key_id != key_id:
                    raise ConfigError(
                        f"key file {key_file} holds key '{held.key_id}', the model needs '{key_id}'"
                    )
                self._keys[key_id] = held.key
                return held.key
            if self.broker is None:
                raise ConfigError(
                    f"encrypted model needs key '{key_id}' but no [key_broker] is configured "
                    "and the model's config.toml names no key_file"
                )
            if self.release is None:
                raise KeyReleaseError(
                    f"key '{key_id}' can only be released to an attested server, and this "
                    "server has no attestation platform (attestation_platform / TLS off)"
                )
            from sealserve.enclave.key_release import fetch_model_key

            r, b = self.release, self.broker
            key = fetch_model_key(
                b.target,
                key_id=key_id,
                platform=r.platform,
                tls_spki=r.tls_spki,
                manifest=r.manifest,
                hpke_private_key=r.hpke_private_key,
                broker_ca_pem=b.ca_file.read_bytes() if b.ca_file else None,
                broker_server_name=b.server_name,
                timeout=b.timeout_seconds,
                retries=b.retries,
            )
            log.info("key '%s' released by the key broker %s after attestation", key_id, b.target)
            self._keys[key_id] = key
            return key


@dataclass(frozen=True)
class EncryptedModelSource:
    """A ``model.sealed`` file: the header gives the key id and plaintext digest up front."""

    path: Path
    #: The development key file the model's config.toml names (None: the broker).
    key_file: Path | None = None

    def header_digest(self) -> tuple[str, str]:
        """(key id, plaintext SHA-256 hex) from the header, without the key."""
        try:
            with self.path.open("rb") as f:
                header = read_header(f)
        except OSError as exc:
            raise ConfigError(f"cannot read encrypted model {self.path}: {exc.strerror}") from exc
        except CryptoError as exc:
            raise type(exc)(f"{self.path}: {exc.message}", remedy=exc.remedy) from exc
        return header.key_id, header.plaintext_sha256.hex()

    def read(self, keys: KeyProvider) -> bytes:
        key_id, digest = self.header_digest()
        key = keys.get(key_id, key_file=self.key_file)
        try:
            with self.path.open("rb") as f:
                data = decrypt_to_bytes(f, key=key, expected_sha256=bytes.fromhex(digest))
        except OSError as exc:
            raise ConfigError(f"cannot read encrypted model {self.path}: {exc.strerror}") from exc
        except CryptoError as exc:
            raise type(exc)(f"{self.path}: {exc.message}", remedy=exc.remedy) from exc
        return data

    def describe(self) -> str:
        return f"encrypted:{self.path}"
