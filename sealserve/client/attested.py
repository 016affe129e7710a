"""Verify, then trust: attest a sealserve endpoint before any user data is sent.

1. Fetch the server's TLS certificate (unauthenticated, not yet trusted).
2. Open a TLS channel that trusts exactly that certificate, and ask it for evidence
   with a fresh random nonce (``Attestation.GetEvidence``, or on the REST port
   ``GET /v2/sealserve/evidence?nonce=HEX``: no token is sent).
3. Verify the evidence against the caller's policy and trusted roots: the hardware
   report and its chain, the nonce (freshness), and the REPORT_DATA binding of the
   nonce, the TLS key, the workload manifest, the HPKE key and the runtime keys record
   (``AttestedEndpoint.runtime_keys``: e.g. the audit log's public key).
4. Check that the TLS key bound in the evidence is the key of the certificate the
   channel pinned. Only then does the caller get the pinned certificate for the
   channel that carries tokens and inference data.

Any failure raises an :class:`~sealserve.errors.AttestationError` whose ``check``
names the step.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealserve._proto import attestation_pb2 as apb
from sealserve._proto import attestation_pb2_grpc
from sealserve.attestation.claims import Claims, Policy
from sealserve.attestation.evidence import Evidence, verify_evidence
from sealserve.attestation.policy import DEFAULT_POLICY, load_policy
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.errors import EvidenceFormatError, UnavailableError, VerificationError

# The name every attested server's in-memory certificate carries (server/app.py).
ATTESTED_NAME = "sealserve.attested"
NONCE_BYTES = 32


@dataclass(frozen=True)
class AttestedEndpoint:
    """What a successful attestation established about ``target``."""

    target: str
    certificate_pem: bytes
    evidence: Evidence
    claims: Claims

    @property
    def runtime_keys(self) -> RuntimeKeys:
        """The public keys the attested server made at its first start (its audit log's
        signing key: what ``sealserve audit verify --public-key`` needs), verified with
        the evidence: REPORT_DATA binds them."""
        keys = self.claims.runtime_keys
        if keys is None:  # a verifier that did not check the record: parse nothing
            raise VerificationError(
                "runtime_keys: the claims carry no verified runtime keys", check="runtime_keys"
            )
        return keys


def _split(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise UnavailableError(f"target {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_certificate(target: str, *, timeout: float = 10.0) -> bytes:
    """The server's TLS certificate, PEM. Not trusted by itself: attestation decides."""
    host, port = _split(target)
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout).encode()
    except (OSError, ssl.SSLError) as exc:
        raise UnavailableError(f"cannot fetch the TLS certificate of {target}: {exc}") from exc


def spki_of(cert_pem: bytes) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise EvidenceFormatError(
            "the server's certificate cannot be parsed", check="tls_certificate"
        ) from exc
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pinned_channel(target: str, cert_pem: bytes, **options: str | int) -> grpc.Channel:
    """A TLS channel that trusts exactly ``cert_pem`` (self-signed server certificate)."""
    opts: list[tuple[str, str | int]] = [("grpc.ssl_target_name_override", ATTESTED_NAME)]
    opts += list(options.items())
    creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
    return grpc.secure_channel(target, creds, options=opts)


def get_evidence(channel: grpc.Channel, nonce: bytes, *, timeout: float = 10.0) -> Evidence:
    stub = attestation_pb2_grpc.AttestationStub(channel)
    try:
        resp = stub.GetEvidence(apb.GetEvidenceRequest(nonce=nonce), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        raise UnavailableError(
            f"GetEvidence failed: {code.name if code else 'error'}: "
            f"{exc.details() if hasattr(exc, 'details') else exc}"
        ) from exc
    return Evidence.from_bytes(bytes(resp.evidence))


def get_evidence_http(
    target: str, cert_pem: bytes, nonce: bytes, *, timeout: float = 10.0
) -> Evidence:
    """Evidence from a REST port, over TLS that trusts exactly ``cert_pem``."""
    from sealserve.client.rest import RestConnection, from_http_error, pinned_context

    conn = RestConnection(
        target, context=pinned_context(cert_pem), server_name=ATTESTED_NAME, timeout=timeout
    )
    try:
        status, headers, body = conn.request("GET", f"/v2/sealserve/evidence?nonce={nonce.hex()}")
    finally:
        conn.close()
    if status != 200:
        error = from_http_error(status, headers, body)
        raise UnavailableError(f"GetEvidence failed: HTTP {status}: {error.message}")
    return Evidence.from_bytes(body)


def resolve_policy(policy: Policy | str | Path | None) -> Policy:
    if policy is None:
        return DEFAULT_POLICY
    if isinstance(policy, str | Path):
        return load_policy(policy)
    return policy


def attest(
    target: str,
    *,
    policy: Policy | str | Path | None = None,
    roots: TrustedRoots | None = None,
    timeout: float = 10.0,
    nonce_source: Callable[[int], bytes] = os.urandom,
    verify: Callable[..., Claims] = verify_evidence,
    protocol: str = "grpc",
) -> AttestedEndpoint:
    """Attest ``target`` (steps 1-4 of the module docstring) and return what was proven.

    ``policy`` is a policy object, a policy file path, or None for the default policy
    (real TEEs only, no debug). ``roots`` defaults to AMD's and Intel's pinned roots.
    ``protocol``: "grpc" (the gRPC port) or "http" (the REST port).
    Raises AttestationError (``check`` names the failed step) or UnavailableError.
    """
    rules = resolve_policy(policy)
    trusted = roots if roots is not None else TrustedRoots.vendors()
    cert_pem = fetch_certificate(target, timeout=timeout)
    spki = spki_of(cert_pem)
    nonce = nonce_source(NONCE_BYTES)
    if protocol == "http":
        evidence = get_evidence_http(target, cert_pem, nonce, timeout=timeout)
    else:
        channel = pinned_channel(target, cert_pem)
        try:
            evidence = get_evidence(channel, nonce, timeout=timeout)
        finally:
            channel.close()
    claims = verify(evidence, policy=rules, roots=trusted, expected_nonce=nonce)
    if not hmac.compare_digest(evidence.tls_spki, spki):
        raise VerificationError(
            "tls_binding: the TLS key this connection uses is not the key bound in the "
            "attestation evidence (a different server, or a machine in the middle)",
            check="tls_binding",
        )
    return AttestedEndpoint(target, cert_pem, evidence, claims)
