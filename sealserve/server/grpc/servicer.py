"""gRPC adapter for the Open Inference Protocol: decode, call the data plane, encode."""

from __future__ import annotations

import time
from typing import Any

import grpc

from sealserve._proto import grpc_service_pb2 as pb
from sealserve.defense.guard import ANONYMOUS, Caller, ProofOfWork
from sealserve.defense.store.base import Remaining
from sealserve.rpc.status import grpc_errors, status_code
from sealserve.server.dataplane import DataPlane, PendingRequest
from sealserve.server.grpc.auth_interceptor import current_principal
from sealserve.server.grpc.codec import (
    declared_batch,
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
    requested_outputs,
)
from sealserve.server.metrics import Metrics


class InferenceServicer:
    """Implements inference.GRPCInferenceService; Triton-only RPCs stay UNIMPLEMENTED."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self._plane = plane
        self._metrics = metrics
        # Labelled metric children per model version, resolved once (labels() is slow).
        self._ok: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Caller, ProofOfWork | None]:
        principal = current_principal()
        forwarded = challenge = solution = None
        for key, value in context.invocation_metadata() or ():
            if key == "x-forwarded-for":
                forwarded = value
            elif key == "sealserve-pow-challenge":
                challenge = value
            elif key == "sealserve-pow-solution":
                solution = value
        caller = self._plane.guard.caller(
            account=principal.account if principal else None,
            tier=principal.tier if principal else None,
            transport_peer=context.peer() or "",
            forwarded_for=forwarded,
        )
        pow_ = ProofOfWork(challenge, solution) if challenge and solution else None
        return caller, pow_

    def _count_ok(self, labels: list[str], seconds: float) -> None:
        key = (labels[0], labels[1])
        pair = self._ok.get(key)
        if pair is None:
            pair = (
                self._metrics.requests.labels(*key, "OK", "grpc"),
                self._metrics.latency.labels(*key, "grpc"),
            )
            self._ok[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    @grpc_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    @grpc_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    @grpc_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    def before_body(self, context: grpc.aio.ServicerContext) -> None:
        """ModelInfer's check on its header alone, before its body is read: an account
        refused within the last few seconds is refused again without reading its tensors."""
        principal = current_principal()
        self._plane.refused_recently(principal.account if principal else ANONYMOUS)

    @grpc_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return encode_model_metadata(self._plane.model_metadata(request.name, request.version))

    @grpc_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        # Metric labels only name served models: arbitrary client strings would let
        # anyone grow the label set without bound.
        labels = ["(unknown)", ""]
        try:
            response = await self._infer(request, context, labels)
        except Exception as exc:  # counted here, answered by grpc_errors
            self._metrics.requests.labels(*labels, status_code(exc).name, "grpc").inc()
            raise
        self._count_ok(labels, time.perf_counter() - t0)
        return response

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, labels: list[str]
    ) -> pb.ModelInferResponse:
        """Decode, admit, infer, release, encode; ``labels`` gets the served model's
        name and version as soon as it is known."""
        loaded = self._plane.model(request.model_name, request.model_version)
        labels[:] = [loaded.info.name, loaded.info.version]
        caller, pow_ = self._caller(context)
        # Admission on what the request declares; its tensors are decoded only after.
        pending = PendingRequest(
            loaded.info.name,
            declared_batch(request),
            lambda: decode_infer_request(
                request, loaded.info, max_bytes=self._plane.max_request_bytes
            ),
            outputs=requested_outputs(request, loaded.info),
        )
        result, remaining = await self._plane.infer_pending(pending, caller, pow_=pow_)
        if remaining:
            context.set_trailing_metadata(
                (("sealserve-quota-remaining", format_remaining(remaining)),)
            )
        return encode_infer_response(result)


def format_remaining(remaining: tuple[Remaining, ...]) -> str:
    """``name=remaining/limit`` pairs, e.g. ``account.day=995/1000,peer.minute=58/60``."""
    return ",".join(f"{r.name}={r.remaining}/{r.limit}" for r in remaining)
