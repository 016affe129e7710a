"""gRPC adapter for ``sealserve.v1.Attestation``: fresh evidence for a verifier's nonce."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from sealserve._proto import attestation_pb2 as apb
from sealserve.attestation.binding import check_nonce
from sealserve.attestation.runtime_keys import NO_RUNTIME_KEYS
from sealserve.enclave.platform import Platform, attest
from sealserve.errors import AttestationError, InputError, RateLimitedError
from sealserve.rpc.status import grpc_errors
from sealserve.server.grpc.per_peer import PeerRate


class AttestationServicer:
    def __init__(
        self,
        platform: Platform,
        *,
        tls_spki: bytes,
        manifest: bytes,
        hpke_public_key: bytes,
        runtime_keys: bytes = NO_RUNTIME_KEYS,
        per_peer_per_minute: int = 60,
        audit_head: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self._platform = platform
        # Evidence is public (a client verifies before it sends a token) and costs a
        # hardware report: each peer gets a bounded rate.
        self._rate = PeerRate(per_peer_per_minute)
        self._tls_spki = tls_spki
        self._manifest = manifest
        self._hpke = hpke_public_key
        self._runtime_keys = runtime_keys
        # The audit log's head signed for the nonce (by the key the runtime keys name).
        self._audit_head = audit_head

    def check_rate(self, peer: str) -> None:
        """Take one evidence call from ``peer``'s per-minute allowance (gRPC and REST
        share it). Raises RateLimitedError when it is spent."""
        wait = self._rate.take(peer)
        if wait:
            raise RateLimitedError(
                "evidence rate limit for this address exceeded", retry_after=wait
            )

    def evidence(self, nonce: bytes) -> bytes:
        """Evidence bytes binding ``nonce``, this server's TLS key, manifest, HPKE key
        and runtime keys record."""
        try:
            check_nonce(nonce)
        except AttestationError as exc:
            raise InputError(exc.message) from exc
        evidence = attest(
            self._platform,
            nonce=nonce,
            tls_spki=self._tls_spki,
            manifest=self._manifest,
            hpke_public_key=self._hpke,
            runtime_keys=self._runtime_keys,
        )
        return evidence.to_bytes()

    @grpc_errors
    async def GetEvidence(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> apb.GetEvidenceResponse:
        self.check_rate(context.peer() or "")
        loop = asyncio.get_running_loop()
        # A real platform's report goes through the kernel: keep it off the loop.
        nonce = bytes(request.nonce)
        data = await loop.run_in_executor(None, self.evidence, nonce)
        head = self._audit_head(nonce) if self._audit_head is not None else None
        return apb.GetEvidenceResponse(evidence=data, audit_head=head or b"")
