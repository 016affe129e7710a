"""Enclave side of key release: obtain a model's data key from the key broker.

:func:`fetch_model_key` runs the protocol of docs/key-broker.md: ``GetChallenge`` ->
evidence from the platform binding the challenge, the server's TLS key, the workload
manifest and the enclave's HPKE public key -> ``ReleaseKey`` -> open the HPKE-sealed
data key with the enclave's private key. The broker's TLS certificate is pinned with
the PEM the server's ``[key_broker] ca_file`` holds (its certificate or CA).

A broker restart is routine: until the broker answers, the exchange is retried with
capped, jittered exponential backoff (a TLS verification failure too: the broker may be
rotating its certificate, and the pin is read again before each attempt). Only a
refusal (``PERMISSION_DENIED``) or the operator's deadline (``[key_broker] wait_s``)
ends the wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
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

# The broker says no (every refusal is this one code): waiting will not change it.
_DEFINITIVE = (grpc.StatusCode.PERMISSION_DENIED,)
# How gRPC words a peer certificate that does not verify (its versions differ).
_TLS_FAILURES = ("certificate_verify_failed", "handshake failed", "verification check failed")
_MAX_DETAIL = 200
TLS_HINT = (
    "the broker's certificate does not verify against [key_broker] ca_file (or its name "
    "is not [key_broker] server_name); the broker may be restarting with a new "
    "certificate: give it a lasting one (broker tls_cert_file / tls_key_file, "
    "`sealserve broker init-tls`) and put that certificate or its CA in [key_broker] ca_file"
)


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
    broker_ca_source: Callable[[], bytes | None] | None = None,
    runtime_keys: bytes = NO_RUNTIME_KEYS,
    broker_server_name: str | None = None,
    timeout: float = 10.0,
    wait: float | None = None,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> bytes:
    """Ask the broker at ``target`` ("host:port") for the data key ``key_id``.

    ``tls_spki``, ``manifest`` and ``runtime_keys`` are what this server's own evidence
    binds (its TLS SubjectPublicKeyInfo DER, workload manifest bytes and runtime keys
    record); the evidence sent to the
    broker carries the raw X25519 public key of ``hpke_private_key``. ``broker_ca_pem``
    pins the broker's certificate (None: system roots); ``broker_ca_source``, if given,
    is called before each later attempt for the current pin (a rotated file).
    ``broker_server_name`` overrides the name checked in it. Each RPC has ``timeout``
    seconds.

    Any failure other than a refusal (broker unreachable, restarting, timing out, TLS
    not verifying) is retried: the whole exchange again after ``backoff``, 2x, 4x, ...
    seconds, capped at ``max_backoff``, each delay drawn uniformly from its upper half
    (jitter, so that replicas do not stampede a restarted broker). ``wait`` seconds
    (None: no deadline) bound the whole wait. Returns the 32-byte data key.

    Raises KeyReleaseError: the broker refused (its log says why), the ``wait`` deadline
    passed, the broker sent an unusable challenge, or a key that does not open. Raises
    UnavailableError if the platform cannot produce a report.
    """
    request = _Request(target, key_id, platform, tls_spki, manifest, hpke_private_key, runtime_keys)
    deadline = None if wait is None else clock() + wait
    ca_pem = broker_ca_pem
    delay = backoff
    attempt = 0
    while True:
        attempt += 1
        if broker_ca_source is not None and attempt > 1:
            ca_pem = broker_ca_source()
        remaining = None if deadline is None else deadline - clock()
        rpc_timeout = timeout if remaining is None else max(0.1, min(timeout, remaining))
        try:
            return _exchange(
                request, ca_pem=ca_pem, server_name=broker_server_name, timeout=rpc_timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = str(exc.details() if hasattr(exc, "details") else exc)[:_MAX_DETAIL]
            if code in _DEFINITIVE:
                raise KeyReleaseError(
                    f"key broker {target} refused to release key {key_id!r}: {detail}",
                    remedy="The broker's log names the check that failed; compare this "
                    "enclave's measurement and manifest with the key's release policy.",
                ) from exc
            tls = any(word in detail.lower() for word in _TLS_FAILURES)
            reason = f"TLS verification failed ({TLS_HINT})" if tls else f"unavailable ({detail})"
        pause = min(delay, max_backoff) * (0.5 + 0.5 * jitter())
        if deadline is not None and clock() >= deadline:
            raise KeyReleaseError(
                f"key broker {target}: no key {key_id!r} within [key_broker] wait_s = "
                f"{wait:g} s ({attempt} attempts); last: {reason}",
                remedy="Start or fix the key broker, check [key_broker] target and "
                "ca_file, or raise [key_broker] wait_s (unset: wait without a deadline).",
            )
        if deadline is not None:
            pause = min(pause, deadline - clock())  # one last attempt at the deadline
        log_at = log.warning if tls or attempt <= 3 or attempt % 10 == 0 else log.info
        log_at(
            "key broker %s %s; waiting for key %r: attempt %d, next in %.1f s%s",
            target,
            reason,
            key_id,
            attempt,
            pause,
            "" if wait is None else f" ([key_broker] wait_s = {wait:g} s)",
        )
        sleep(pause)
        delay = min(delay * 2, max_backoff)


@dataclass(frozen=True)
class _Request:
    """What one attempt sends: who asks for which key, with what its evidence binds."""

    target: str
    key_id: str
    platform: Platform
    tls_spki: bytes
    manifest: bytes
    hpke_private_key: X25519PrivateKey
    runtime_keys: bytes = NO_RUNTIME_KEYS


def _exchange(
    req: _Request, *, ca_pem: bytes | None, server_name: str | None, timeout: float
) -> bytes:
    """One attempt on a fresh channel (a restarted broker, a rotated pin). Raises
    grpc.RpcError for the caller to judge, KeyReleaseError for a broken answer."""
    target, key_id = req.target, req.key_id
    options: list[tuple[str, Any]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(target, credentials, options=options) as channel:
        stub = broker_pb2_grpc.KeyBrokerStub(channel)
        challenge = stub.GetChallenge(bpb.GetChallengeRequest(), timeout=timeout)
        nonce = bytes(challenge.nonce)
        try:
            evidence = attest(
                req.platform, nonce=nonce, tls_spki=req.tls_spki, manifest=req.manifest,
                hpke_public_key=hpke_public_bytes(req.hpke_private_key),
                runtime_keys=req.runtime_keys,
            )  # fmt: skip
        except AttestationError as exc:  # e.g. a broker that sent a short nonce
            raise KeyReleaseError(
                f"key broker {target} sent an unusable challenge: {exc.message}"
            ) from exc
        response = stub.ReleaseKey(
            bpb.ReleaseKeyRequest(key_id=key_id, evidence=evidence.to_bytes()), timeout=timeout
        )
    sealed = SealedKey(
        enc=bytes(response.enc),
        ciphertext=bytes(response.ciphertext),
        kem_id=response.kem_id,
        kdf_id=response.kdf_id,
        aead_id=response.aead_id,
    )
    try:
        key = open_data_key(sealed, private_key=req.hpke_private_key, key_id=key_id, nonce=nonce)
    except CryptoError as exc:
        raise KeyReleaseError(
            f"key broker {target} released key {key_id!r} but it does not open: {exc.message}"
        ) from exc
    log.info("data key %r released by the broker after attestation", key_id)
    return key
