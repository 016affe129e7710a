"""gRPC adapter for ``sealserve.v1.Attestation``: fresh evidence for a verifier's nonce."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from sealserve._proto import attestation_pb2 as apb
from sealserve.attestation.binding import check_nonce
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
        per_peer_per_minute: int = 60,
    ) -> None:
        self._platform = platform
        # Evidence is public (a client verifies before it sends a token) and costs a
        # hardware report: each peer gets a bounded rate.
        self._rate = PeerRate(per_peer_per_minute)
        self._tls_spki = tls_spki
        self._manifest = manifest
        self._hpke = hpke_public_key

    def evidence(self, nonce: bytes) -> bytes:
        """Evidence bytes binding ``nonce``, this server's TLS key, manifest and HPKE key."""
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
        )
        return evidence.to_bytes()

    @grpc_errors
    async def GetEvidence(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> apb.GetEvidenceResponse:
        wait = self._rate.take(context.peer() or "")
        if wait:
            raise RateLimitedError(
                "GetEvidence rate limit for this address exceeded", retry_after=wait
            )
        loop = asyncio.get_running_loop()
        # A real platform's report goes through the kernel: keep it off the loop.
        data = await loop.run_in_executor(None, self.evidence, bytes(request.nonce))
        return apb.GetEvidenceResponse(evidence=data)
