"""gRPC adapter for the Open Inference Protocol: decode, call the data plane, encode."""

from __future__ import annotations

import time
from typing import Any

import grpc

from sealserve._proto import grpc_service_pb2 as pb
from sealserve.defense.guard import Caller, ProofOfWork
from sealserve.defense.store import Remaining
from sealserve.server.auth_interceptor import current_principal
from sealserve.server.codec import (
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
)
from sealserve.server.dataplane import DataPlane
from sealserve.server.metrics import Metrics
from sealserve.server.status import abort, abort_status, to_status


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

    def _ok_metrics(self, model: str, version: str) -> tuple[Any, Any]:
        key = (model, version)
        pair = self._ok.get(key)
        if pair is None:
            pair = (
                self._metrics.requests.labels(model, version, "OK", "grpc"),
                self._metrics.latency.labels(model, version, "grpc"),
            )
            self._ok[key] = pair
        return pair

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self._plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            return encode_model_metadata(self._plane.model_metadata(request.name, request.version))
        except Exception as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        # Metric labels only name served models: arbitrary client strings would let
        # anyone grow the label set without bound.
        model, version = "(unknown)", ""
        try:
            loaded = self._plane.model(request.model_name, request.model_version)
            model, version = loaded.info.name, loaded.info.version
            req = decode_infer_request(
                request, loaded.info, max_bytes=self._plane.max_request_bytes
            )
            caller, pow_ = self._caller(context)
            result, remaining = await self._plane.infer(req, caller, pow_=pow_)
            response = encode_infer_response(result)
            if remaining:
                context.set_trailing_metadata(
                    (("sealserve-quota-remaining", format_remaining(remaining)),)
                )
        except Exception as exc:
            status = to_status(exc)
            self._metrics.requests.labels(model, version, status[0].name, "grpc").inc()
            await abort_status(context, *status)
            raise
        ok, latency = self._ok_metrics(model, version)
        ok.inc()
        latency.observe(time.perf_counter() - t0)
        return response


def format_remaining(remaining: tuple[Remaining, ...]) -> str:
    """``name=remaining/limit`` pairs, e.g. ``account.day=995/1000,peer.minute=58/60``."""
    return ",".join(f"{r.name}={r.remaining}/{r.limit}" for r in remaining)
