"""The parent's view of its workers' metrics (``WorkerMetrics``): a healthy worker's
series come through labelled ``worker``; a hung worker, one that answers garbage and one
that cuts its answer short are each ``sealserve_worker_up 0``, and together they cost
the scrape one deadline, not one each."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from sealserve.server.metrics import WorkerMetrics, serve_registry


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def _raw_server(listeners: list[socket.socket], answer: bytes | None) -> int:
    """A loopback listener that answers each connection with ``answer`` (None: never)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    listeners.append(sock)

    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(4096)
            if answer is None:
                time.sleep(30)  # hung: never answers
            else:
                conn.sendall(answer)
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return int(sock.getsockname()[1])


def test_healthy_hung_and_broken_workers(listeners: list[socket.socket]) -> None:
    registry = CollectorRegistry()
    Counter("sealserve_requests", "Requests.", ["model"], registry=registry).labels("m").inc(3)
    healthy = serve_registry(registry, host="127.0.0.1", port=0)
    hung = [_raw_server(listeners, None) for _ in range(4)]
    garbage = _raw_server(listeners, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot { ok")
    short = _raw_server(listeners, b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n# HELP x y\n")
    endpoints = {1: healthy, 2: garbage, 3: short, **{4 + i: p for i, p in enumerate(hung)}}
    parent = CollectorRegistry(auto_describe=False)
    parent.register(WorkerMetrics(endpoints, timeout_s=1.0))
    started = time.monotonic()
    text = generate_latest(parent).decode()
    assert time.monotonic() - started < 3.0  # one deadline for all four hung workers
    assert 'sealserve_requests_total{model="m",worker="1"} 3.0' in text
    assert 'sealserve_worker_up{worker="1"} 1.0' in text
    for index in range(2, 8):
        assert f'sealserve_worker_up{{worker="{index}"}} 0.0' in text
