"""Enclave side of key release: obtain a model's data key from the key broker.

:func:`fetch_model_key` runs the protocol of docs/key-broker.md: ``GetChallenge`` ->
evidence from the platform binding the challenge, the server's TLS key, the workload
manifest and the enclave's HPKE public key -> ``ReleaseKey`` -> open the HPKE-sealed
data key with the enclave's private key. The broker's TLS certificate is pinned with
``broker_ca_pem`` (its certificate or CA, from the server's config).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sealserve._proto import broker_pb2 as bpb
from sealserve._proto import broker_pb2_grpc
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS
from sealserve.enclave.key_wrap import SealedKey, open_data_key
from sealserve.enclave.platform import Platform, attest
from sealserve.errors import AttestationError, CryptoError, KeyReleaseError

log = logging.getLogger("sealserve.enclave.key_release")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def hpke_public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32 raw public bytes that go into evidence as ``hpke_public_key``."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fetch_model_key(
    target: str,
    *,
    key_id: str,
    platform: Platform,
    tls_spki: bytes,
    manifest: bytes,
    hpke_private_key: X25519PrivateKey,
    broker_ca_pem: bytes | None,
    runtime_keys: bytes = NO_RUNTIME_KEYS,
    broker_server_name: str | None = None,
    timeout: float = 10.0,
    retries: int = 6,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Ask the broker at ``target`` ("host:port") for the data key ``key_id``.

    ``tls_spki``, ``manifest`` and ``runtime_keys`` are what this server's own evidence
    binds (its TLS SubjectPublicKeyInfo DER, workload manifest bytes and runtime keys
    record); the evidence sent to the
    broker carries the raw X25519 public key of ``hpke_private_key``. ``broker_ca_pem``
    pins the broker's certificate (None: system roots); ``broker_server_name``
    overrides the name checked in it. Each RPC has ``timeout`` seconds. While the
    broker is UNAVAILABLE (or a call times out) the whole exchange is retried up to
    ``retries`` more times, sleeping ``backoff``, 2x``backoff``, ... (at most
    ``max_backoff``) in between. Returns the 32-byte data key.

    Raises KeyReleaseError: the broker refused (its log says why), did not answer
    after the retries, or returned a key that does not open. Raises UnavailableError
    if the platform cannot produce a report.
    """
    options: list[tuple[str, Any]] = []
    if broker_server_name:
        options.append(("grpc.ssl_target_name_override", broker_server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=broker_ca_pem)
    public = hpke_public_bytes(hpke_private_key)
    delay = backoff
    with grpc.secure_channel(target, credentials, options=options) as channel:
        stub = broker_pb2_grpc.KeyBrokerStub(channel)
        for attempt in range(retries + 1):
            try:
                challenge = stub.GetChallenge(bpb.GetChallengeRequest(), timeout=timeout)
                nonce = bytes(challenge.nonce)
                try:
                    evidence = attest(
                        platform,
                        nonce=nonce,
                        tls_spki=tls_spki,
                        manifest=manifest,
                        hpke_public_key=public,
                        runtime_keys=runtime_keys,
                    )
                except AttestationError as exc:  # e.g. a broker that sent a short nonce
                    raise KeyReleaseError(
                        f"key broker {target} sent an unusable challenge: {exc.message}"
                    ) from exc
                response = stub.ReleaseKey(
                    bpb.ReleaseKeyRequest(key_id=key_id, evidence=evidence.to_bytes()),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                if code in _RETRYABLE and attempt < retries:
                    log.warning(
                        "key broker %s unavailable (%s); retry %d/%d in %.2g s",
                        target,
                        detail,
                        attempt + 1,
                        retries,
                        delay,
                    )
                    sleep(delay)
                    delay = min(delay * 2, max_backoff)
                    continue
                if code in _RETRYABLE:
                    raise KeyReleaseError(
                        f"key broker {target} unreachable after {retries + 1} attempts: {detail}",
                        remedy="Check the broker address, that it runs, and broker_ca_pem.",
                    ) from exc
                raise KeyReleaseError(
                    f"key broker {target} refused to release key {key_id!r}: {detail}",
                    remedy="The broker's log names the check that failed; compare this "
                    "enclave's measurement and manifest with the key's release policy.",
                ) from exc
            sealed = SealedKey(
                enc=bytes(response.enc),
                ciphertext=bytes(response.ciphertext),
                kem_id=response.kem_id,
                kdf_id=response.kdf_id,
                aead_id=response.aead_id,
            )
            try:
                key = open_data_key(
                    sealed, private_key=hpke_private_key, key_id=key_id, nonce=nonce
                )
            except CryptoError as exc:
                raise KeyReleaseError(
                    f"key broker {target} released key {key_id!r} but it does not open: "
                    f"{exc.message}"
                ) from exc
            log.info("data key %r released by the broker after attestation", key_id)
            return key
    raise AssertionError("unreachable")  # pragma: no cover
