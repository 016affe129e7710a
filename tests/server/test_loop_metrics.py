"""The serving path's lock-free series expose what prometheus_client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sealserve.server.metrics import LoopCounter, LoopHistogram, Metrics


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    r = CollectorRegistry()
    h = LoopHistogram("t_latency", "doc", ["model"], r, buckets=(0.1, 1.0))
    s = h.labels("m")
    for x in (0.05, 0.1, 0.5, 1.0, 7.0):
        s.observe(x)
    get = r.get_sample_value
    assert get("t_latency_bucket", {"model": "m", "le": "0.1"}) == 2  # 0.1 <= 0.1
    assert get("t_latency_bucket", {"model": "m", "le": "1.0"}) == 4
    assert get("t_latency_bucket", {"model": "m", "le": "+Inf"}) == 5
    assert get("t_latency_count", {"model": "m"}) == 5
    assert get("t_latency_sum", {"model": "m"}) == pytest.approx(8.65)
    assert h.labels("m") is s  # one series per label set


def test_counter_and_text_exposition() -> None:
    r = CollectorRegistry()
    c = LoopCounter("t_requests", "Requests.", ["code"], r)
    c.labels("OK").inc()
    c.labels("OK").inc(2)
    c.labels(404).inc()  # label values are strings, as prometheus_client makes them
    text = generate_latest(r).decode()
    assert 't_requests_total{code="OK"} 3.0' in text
    assert 't_requests_total{code="404"} 1.0' in text
    assert "# TYPE t_requests_total counter" in text
    with pytest.raises(ValueError, match="expected 1 label values"):
        c.labels("a", "b")


def test_server_metrics_register_once_per_registry() -> None:
    m = Metrics()
    m.latency.labels("digits", "1", "grpc").observe(0.001)
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    assert "sealserve_request_latency_seconds_bucket" in names
    with pytest.raises(ValueError):  # a second family of the same name is refused
        LoopCounter("sealserve_requests", "dup", ["x"], m.registry)
