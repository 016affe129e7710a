"""Prometheus metrics, in a registry of their own, served on their own port.

The per-request series (requests, latency, batch size, queue time) are observed on the
serving path, which runs on the server's event loop. prometheus_client's own Counter
and Histogram take a lock for every value they change (a histogram observation two),
which costs more than the rest of a small model's bookkeeping; these series are plain
numbers the loop's thread changes and the registry reads at scrape, through
prometheus_client's collector API (the exposition is the library's).
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("sealserve.metrics")

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip


class CounterSeries:
    """One label set of a :class:`LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramSeries:
    """One label set of a :class:`LoopHistogram`: a count per bucket (not cumulative;
    the last is +Inf) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (Prometheus' "le").
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


S = TypeVar("S", CounterSeries, HistogramSeries)


class _Family(Collector, Generic[S]):
    """Labelled series observed from one thread (the event loop) without a lock per
    observation; ``labels`` (which may create a series) and scrapes take one."""

    _kind: type[CounterMetricFamily | HistogramMetricFamily]

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], S] = {}
        registry.register(self)

    def _new_series(self) -> S:
        raise NotImplementedError

    def _add(self, family: Metric, key: list[str], series: S) -> None:
        raise NotImplementedError

    def labels(self, *values: object) -> S:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected {len(self._labelnames)} label values")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, self._new_series())
        return series

    def describe(self) -> Iterator[Metric]:
        yield self._kind(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._kind(self._name, self._doc, labels=self._labelnames)
        with self._lock:
            items = list(self._series.items())
        for key, series in items:
            self._add(family, list(key), series)
        yield family


class LoopCounter(_Family[CounterSeries]):
    """A labelled counter (``labels(...).inc()``) for the serving path."""

    _kind = CounterMetricFamily

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def _add(self, family: Metric, key: list[str], series: CounterSeries) -> None:
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(key, series.value)


class LoopHistogram(_Family[HistogramSeries]):
    """A labelled histogram (``labels(...).observe(x)``) for the serving path."""

    _kind = HistogramMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry, *, buckets: Sequence[float],
    ) -> None:  # fmt: skip
        self.bounds = (*sorted(float(b) for b in buckets), float("inf"))
        super().__init__(name, documentation, labelnames, registry)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def _add(self, family: Metric, key: list[str], series: HistogramSeries) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative = accumulate(list(series.counts))
        buckets = [
            (floatToGoString(b), float(c))  # type: ignore[no-untyped-call]
            for b, c in zip(self.bounds, cumulative, strict=True)
        ]
        family.add_metric(key, buckets, series.sum)


class _DefenseCollector(Collector):
    def __init__(
        self, cohort_alerts: Callable[[], int], queued_rows: Callable[[], int] | None
    ) -> None:
        self._alerts = cohort_alerts
        self._queued = queued_rows

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "sealserve_cohort_alerts",
            "Cohorts of young accounts flagged by this process (an episode starts).",
            value=self._alerts(),
        )
        if self._queued is not None:
            yield GaugeMetricFamily(
                "sealserve_detection_queued_rows",
                "Rows answered and waiting to be observed (detection_mode = beside).",
                value=self._queued(),
            )


class Metrics:
    """Every metric the server exports. One instance, built by the composition root."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter(
            "sealserve_requests",
            "Inference requests by model, version, status code (the gRPC code's name on "
            "the gRPC port, the HTTP status on the REST port) and protocol (grpc, rest).",
            ["model", "version", "code", "protocol"],
            r,
        )
        self.latency = LoopHistogram(
            "sealserve_request_latency_seconds",
            "Inference latency inside the server (decode to encode), by protocol.",
            ["model", "version", "protocol"],
            r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_time = LoopHistogram(
            "sealserve_queue_seconds",
            "Time a request waited in the batching queue before its batch ran.",
            ["model", "version"],
            r,
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = LoopHistogram(
            "sealserve_batch_size",
            "Requests per onnxruntime run.",
            ["model", "version"],
            r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
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

    def watch_defenses(
        self, cohort_alerts: Callable[[], int], queued_rows: Callable[[], int] | None
    ) -> None:
        """Export the defenses' own counts, read at scrape: cohort flags raised by this
        process, and (with detection beside the request path) the rows waiting to be
        observed."""
        self.registry.register(_DefenseCollector(cohort_alerts, queued_rows))

    def serve(self, *, host: str, port: int) -> int:
        """Expose the registry over HTTP on ``host:port`` (a daemon thread); returns the
        port (the one picked, for port 0)."""
        return serve_registry(self.registry, host=host, port=port)


def serve_registry(registry: CollectorRegistry, *, host: str, port: int) -> int:
    """prometheus_client's HTTP exposition of ``registry`` on ``host:port`` (a daemon
    thread); returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class WorkerMetrics(Collector):
    """The parent's ``/metrics`` with ``workers = N``: at each scrape it reads every
    worker's exposition from its loopback port (``endpoints``: worker index -> port),
    parses it with prometheus_client's parser and yields every series with a
    ``worker`` label, plus ``sealserve_worker_up{worker}`` (0 when a worker's metrics
    could not be read within ``timeout_s``)."""

    def __init__(self, endpoints: dict[int, int], *, timeout_s: float = 2.0) -> None:
        self.endpoints = dict(endpoints)
        self.timeout_s = timeout_s

    def collect(self) -> Iterator[Metric]:
        from concurrent.futures import ThreadPoolExecutor, wait

        families: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "sealserve_worker_up",
            "1 when the parent read this worker's metrics at this scrape, else 0.",
            labels=["worker"],
        )
        # All workers at once, under one deadline: hung workers cost one timeout, not one
        # each (a scrape must finish inside Prometheus's own timeout, 10 s by default).
        pool = ThreadPoolExecutor(max_workers=max(1, min(16, len(self.endpoints))))
        try:
            futures = {i: pool.submit(self._read, p) for i, p in self.endpoints.items()}
            wait(futures.values(), timeout=self.timeout_s)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        for index, future in sorted(futures.items()):
            parsed = None
            if future.done() and not future.cancelled():
                try:
                    parsed = future.result()
                except Exception as exc:  # any failure of one worker: it is down, not us
                    log.warning("metrics: worker %d unreadable: %s", index, exc)
            if parsed is None:
                up.add_metric([str(index)], 0)
                continue
            up.add_metric([str(index)], 1)
            label = str(index)
            for family in parsed:
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples += [s._replace(labels={**s.labels, "worker": label})
                                   for s in family.samples]  # fmt: skip
        yield from families.values()
        yield up

    def _read(self, port: int) -> list[Metric]:
        """One worker's exposition, parsed. Raises on any failure, a short body included."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
            body = response.read(_MAX_EXPOSITION)
            length = response.headers.get("Content-Length")
        if length is not None and int(length) != len(body):
            raise ValueError(f"{len(body)} of {length} bytes")
        return list(text_string_to_metric_families(body.decode("utf-8")))


_MAX_EXPOSITION = 16 << 20
