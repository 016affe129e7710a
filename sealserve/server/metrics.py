"""Prometheus metrics, in a registry of their own, served on their own port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("sealserve.metrics")

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip


class Metrics:
    """Every metric the server exports. One instance, built by the composition root."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sealserve_requests",
            "Inference requests by model, version, status code (the gRPC code's name on "
            "the gRPC port, the HTTP status on the REST port) and protocol (grpc, rest).",
            ["model", "version", "code", "protocol"],
            registry=r,
        )
        self.latency = Histogram(
            "sealserve_request_latency_seconds",
            "Inference latency inside the server (decode to encode), by protocol.",
            ["model", "version", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "sealserve_queue_seconds",
            "Time a request waited in the batching queue before its batch ran.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sealserve_batch_size",
            "Requests per onnxruntime run.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.refusals = Counter(
            "sealserve_refusals",
            "Requests refused before inference, by reason (auth, quota, suspended, ...).",
            ["reason"],
            registry=r,
        )
        self.models_ready = Gauge(
            "sealserve_models_ready", "Model versions loaded and ready.", registry=r
        )

    def serve(self, *, host: str, port: int) -> None:
        """Expose the registry over HTTP on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
