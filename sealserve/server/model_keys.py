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

from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS
from sealserve.enclave.key_file import KeyFile
from sealserve.enclave.model_file import decrypt_to_bytes, read_header
from sealserve.enclave.platform import Platform
from sealserve.errors import ConfigError, CryptoError, KeyReleaseError

log = logging.getLogger("sealserve.keys")


class KeyBrokerSettings(BaseModel):
    """Where encrypted models' keys are released from ([key_broker]; docs/key-broker.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="The key broker's HOST:PORT.")
    ca_file: Path | None = Field(
        default=None,
        description="PEM certificate (or CA) that the broker's TLS must match; read at "
        "start and again before each retry (default: the system roots).",
    )
    server_name: str | None = Field(
        default=None, description="Name to check in the broker's certificate (default: host)."
    )
    timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="Deadline of one call to the broker."
    )
    wait_s: float | None = Field(
        default=None,
        gt=0,
        description="Give up (exit with one error line) when no key came within this many "
        "seconds; unset: wait for the broker as long as it takes (health NOT_SERVING).",
    )
    max_backoff_s: float = Field(
        default=30.0, ge=1, le=600, description="Longest pause between two attempts."
    )


@dataclass
class _CaFile:
    """The broker pin from ``[key_broker] ca_file``: must read at start; read again
    before each retry (the operator may rotate it), keeping the last good one."""

    path: Path
    pem: bytes | None = None

    def first(self) -> bytes:
        try:
            self.pem = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"[key_broker] ca_file {self.path}: cannot read: {exc.strerror}"
            ) from exc
        return self.pem

    def __call__(self) -> bytes | None:
        try:
            self.pem = self.path.read_bytes()
        except OSError as exc:
            log.warning(
                "[key_broker] ca_file %s: cannot read (%s); keeping the last one",
                self.path,
                exc.strerror,
            )
        return self.pem


@dataclass(frozen=True)
class KeyRelease:
    """What this server's evidence publishes, for the broker to release keys to it."""

    platform: Platform
    tls_spki: bytes
    manifest: bytes
    hpke_private_key: X25519PrivateKey = field(repr=False)
    runtime_keys: bytes = NO_RUNTIME_KEYS


@dataclass
class KeyProvider:
    """Data keys by key id: from key files, or released by the broker after attestation
    (``release``: None when this server has no attestation, then only key files work)."""

    broker: KeyBrokerSettings | None = None
    release: KeyRelease | None = None
    _keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    _ca: _CaFile | None = field(default=None, repr=False)

    def check(self) -> None:
        """Read ``[key_broker] ca_file`` now: a pin that cannot be read is a configuration
        error found at start, not a wait. Raises ConfigError."""
        if self.broker is not None and self.broker.ca_file is not None and self._ca is None:
            ca = _CaFile(self.broker.ca_file)
            ca.first()
            self._ca = ca

    def stop(self) -> None:
        """End a wait for the broker in progress (the server is shutting down)."""
        self._stopped.set()

    def _sleep(self, seconds: float) -> None:
        if self._stopped.wait(seconds):
            raise KeyReleaseError("stopped while waiting for the key broker")

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
            self.check()
            source = self._ca
            key = fetch_model_key(
                b.target,
                key_id=key_id,
                platform=r.platform,
                tls_spki=r.tls_spki,
                manifest=r.manifest,
                hpke_private_key=r.hpke_private_key,
                runtime_keys=r.runtime_keys,
                broker_ca_pem=source.pem if source is not None else None,
                broker_ca_source=source,
                broker_server_name=b.server_name,
                timeout=b.timeout_seconds,
                wait=b.wait_s,
                max_backoff=b.max_backoff_s,
                sleep=self._sleep,
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
