"""Bad input on the REST port: each a clear 4xx with a JSON error, the server still
serving. Raw sockets where the attack lives below what an HTTP client lets one send."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import numpy as np

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


def _still_serving(rest: Any) -> None:
    r = httpx.post(f"http://{rest.target}/v2/models/digits/infer", json=GOOD,
                   headers=rest.headers(), timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"]) == 2


def _raw(port: int, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _reply(s: socket.socket) -> bytes:
    """One whole response (status line, headers and the body its length names)."""
    resp = b""
    while not _complete(resp):
        more = s.recv(65536)
        if not more:
            break
        resp += more
    return resp


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _error(resp: bytes) -> str:
    return str(json.loads(resp.partition(b"\r\n\r\n")[2])["error"])


def test_malformed_and_mistyped_requests(rest_server: Any) -> None:
    rest = rest_server()
    url = f"http://{rest.target}/v2/models/digits/infer"
    h = rest.headers()
    cases: list[tuple[Any, int, str]] = [
        (b'{"inputs": [{"name": "input", ', 400, "request body is not valid JSON"),
        ({"inputs": [{**GOOD["inputs"][0], "data": ["a"] * 64}]}, 400,
         "data holds string values, datatype FP32 needs numbers"),
        ({"inputs": [{**GOOD["inputs"][0], "data": [0.0] * 63}]}, 400,
         "shape needs 64 elements, data holds 63"),
        ({"inputs": [{**GOOD["inputs"][0], "datatype": "INT64"}]}, 400,
         "expected datatype FP32, got 'INT64'"),
        ({"inputs": [{**GOOD["inputs"][0], "shape": [0, 64], "data": []}]}, 400,
         "has no rows (batch size 0)"),
    ]  # fmt: skip
    for body, status, message in cases:
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body),
                       headers=h, timeout=10)  # fmt: skip
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["error"]
        assert r.headers["content-type"] == "application/json"
    # Binary extension headers that disagree with the body.
    x = np.zeros((1, 64), np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "parameters": {"binary_data_size": 256}}]}).encode()  # fmt: skip
    for length, extra, message in [
        (len(head), b"", "binary_data_size 256 runs past the 0 bytes"),
        (len(head) + 10**6, x, f"Inference-Header-Content-Length is {len(head) + 10**6}"),
        (len(head), x + b"\0" * 4, "holds 260 bytes of binary data"),
        ("12x", x, "Inference-Header-Content-Length is not a number"),
    ]:
        r = httpx.post(url, content=head + extra, timeout=10,
                       headers={**h, "Inference-Header-Content-Length": str(length)})  # fmt: skip
        assert r.status_code == 400 and message in r.json()["error"], r.text
    r = httpx.post(url, content=head + x, timeout=10,
                   headers={**h, "Inference-Header-Content-Length": str(len(head))})  # fmt: skip
    assert r.status_code == 200, r.text
    # Compressed bodies are refused (no decompression bombs), named short.
    r = httpx.post(url, content=b"x", headers={**h, "Content-Encoding": "gzip" * 50}, timeout=10)
    assert r.status_code == 415 and "Content-Encoding 'gzipgzip" in r.json()["error"]
    assert "(200 chars)" in r.json()["error"]
    _still_serving(rest)


def test_auth_routes_and_methods(rest_server: Any) -> None:
    rest = rest_server()
    base = f"http://{rest.target}"
    r = httpx.post(f"{base}/v2/models/digits/infer", json=GOOD, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing credentials" in r.json()["error"]
    r = httpx.post(f"{base}/v2/models/digits/infer", json=GOOD, timeout=10,
                   headers={"Authorization": "Bearer not.a.jwt"})  # fmt: skip
    assert r.status_code == 401
    meta_only = rest.headers(scopes=("metadata",))
    r = httpx.post(f"{base}/v2/models/digits/infer", json=GOOD, headers=meta_only, timeout=10)
    assert r.status_code == 403 and "infer" in r.json()["error"]
    assert httpx.get(f"{base}/v2/models/digits", headers=meta_only, timeout=10).status_code == 200
    assert httpx.get(f"{base}/v2/models/digits", timeout=10).status_code == 401
    h = rest.headers()
    r = httpx.get(f"{base}/v2/models/digits/infer", headers=h, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.get(f"{base}/v1/models/" + "a" * 300, headers=h, timeout=10)
    assert r.status_code == 404 and "no such route" in r.json()["error"]
    assert "(311 chars)" in r.json()["error"]
    r = httpx.post(f"{base}/v2/models/nope/infer", json=GOOD, headers=h, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "model 'nope' is not served"
    r = httpx.head(f"{base}/v2/models/digits", headers=h, timeout=10)
    assert r.status_code == 200 and r.content == b""  # HEAD: GET's status, no body
    r = httpx.get(f"{base}/v2/sealserve/evidence?nonce=00", timeout=10)
    assert r.status_code == 404 and "no attestation evidence" in r.json()["error"]
    _still_serving(rest)


def test_oversized_bodies_are_refused_before_they_are_read(rest_server: Any) -> None:
    rest = rest_server(max_request_bytes=4096, rest={"max_json_bytes": 4096})
    token = rest.token()
    limit = 4096 + (1 << 20)
    # A declared length over the cap: 413 at once, without sending a byte of body.
    t0 = time.monotonic()
    resp = _raw(rest.port, (
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {10**9}\r\n\r\n").encode())  # fmt: skip
    assert _status(resp) == 413, resp[:200]
    assert f"request body of 1000000000 bytes is over the limit of {limit} bytes" in _error(resp)
    assert time.monotonic() - t0 < 5
    # A chunked body is cut off at the cap while it streams in: the body never ends
    # (no last chunk), yet the answer comes once the cap is crossed.
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        s.sendall((
            "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())  # fmt: skip
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        try:
            for _ in range(limit // 65536 + 2):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _reply(s)
    assert _status(reply) == 413, reply[:200]
    assert f"request body is over the limit of {limit} bytes" in _error(reply)
    # The JSON part has its own, smaller cap (a parsed JSON number costs ~30 bytes).
    big = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                       "data": [0.123456789] * 64}], "pad": "x" * 5000}  # fmt: skip
    r = httpx.post(f"http://{rest.target}/v2/models/digits/infer", json=big,
                   headers=rest.headers(), timeout=10)  # fmt: skip
    assert r.status_code == 400 and "over the limit of 4096" in r.json()["error"]
    _still_serving(rest)


def test_slow_clients_time_out(rest_server: Any) -> None:
    rest = rest_server(rest={"header_timeout_s": 0.5, "body_timeout_s": 0.5})
    # Slow loris: headers that never finish.
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")
        s.sendall(b"X-Slow: 1\r\n")
        resp = _reply(s)
        assert _status(resp) == 408 and "request headers not received within 0.5 s" in _error(resp)
        assert 0.4 < time.monotonic() - t0 < 5
        assert s.recv(1) == b""  # closed
    # A body that trickles in.
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        s.sendall((
            "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {rest.token()}\r\nContent-Length: 100\r\n\r\n{{").encode())  # fmt: skip
        resp = _reply(s)
        assert _status(resp) == 408 and "request body not received within 0.5 s" in _error(resp)
    # Headers too large.
    resp = _raw(rest.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert _status(resp) == 431 and "request headers over the limit" in _error(resp)
    # An idle kept-alive connection is closed after keep_alive_s; a new one is served.
    _still_serving(rest)


def _trickle(s: socket.socket, data: bytes, every_s: float, until_s: float) -> bytes:
    """Send ``data`` a byte every ``every_s`` for up to ``until_s`` seconds, stopping
    when the server answers; returns the answer (b"" if none)."""
    s.settimeout(every_s)
    stop = time.monotonic() + until_s
    for i in range(len(data)):
        if time.monotonic() > stop:
            break
        try:
            s.sendall(data[i : i + 1])
            answer = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset: the server closed after answering
            return b""
        s.settimeout(10)
        return answer + _reply(s) if not _complete(answer) else answer
    return b""


def test_deadlines_count_per_head_and_body_not_per_byte(rest_server: Any) -> None:
    """A client that keeps sending, a byte at a time, never finishes its head or body:
    each byte is progress, but the deadline is the head's (or the body's), on a fresh
    connection and on one that was already served."""
    rest = rest_server(rest={"header_timeout_s": 0.5, "body_timeout_s": 0.5})
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 200
    body = json.dumps(GOOD).encode()
    served = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {rest.token()}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for warm in (False, True):
        with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
            if warm:  # one request answered on this connection first
                s.sendall(served)
                assert _status(_reply(s)) == 200
            t0 = time.monotonic()
            resp = _trickle(s, head, every_s=0.05, until_s=5)
            took = time.monotonic() - t0
            assert resp and _status(resp) == 408, resp[:80]
            assert "request headers not received within 0.5 s" in _error(resp)
            assert 0.4 < took < 2.0, took
        with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
            if warm:
                s.sendall(served)
                assert _status(_reply(s)) == 200
            s.sendall(served[: served.index(b"\r\n\r\n") + 4])  # the head, then a trickle
            t0 = time.monotonic()
            resp = _trickle(s, body, every_s=0.05, until_s=5)
            assert resp and _status(resp) == 408, resp[:80]
            assert "request body not received within 0.5 s" in _error(resp)
            assert 0.4 < time.monotonic() - t0 < 2.0
    _still_serving(rest)


def test_infer_route_table_holds_only_served_models(rest_server: Any) -> None:
    """The parsed-route cache is keyed by the path: only canonical paths of served
    models may enter it, whatever paths clients send; a cached route still checks the
    token, the method and the model's readiness like any other request."""
    rest = rest_server()
    base = f"http://{rest.target}"
    h = rest.headers()
    routes = rest.running.server.rest._config.app._infer_routes
    for i in range(20):
        r = httpx.post(f"{base}/v2/models/nope{i}/infer", json=GOOD, headers=h, timeout=10)
        assert r.status_code == 404
        r = httpx.post(f"{base}//v2/models/digits/infer{'/' * (i + 1)}", json=GOOD,
                       headers=h, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
    assert routes == {}
    _still_serving(rest)
    assert list(routes) == ["/v2/models/digits/infer"]
    r = httpx.post(f"{base}/v2/models/digits/infer", json=GOOD, timeout=10)
    assert r.status_code == 401  # the cached route authenticates like the first time
    r = httpx.post(f"{base}/v2/models/digits/infer", json={"inputs": []}, headers=h, timeout=10)
    assert r.status_code == 400 and "non-empty" in r.json()["error"]
    rest.running.server.plane.close()  # shutting down: not ready
    try:
        r = httpx.post(f"{base}/v2/models/digits/infer", json=GOOD, headers=h, timeout=10)
        assert r.status_code == 503
    finally:
        rest.running.server.plane.open(None)  # this server has no [defense] to arm
    _still_serving(rest)


def test_request_heads_are_bounded_however_they_arrive(rest_server: Any) -> None:
    """The 16 KiB head cap holds for a head in one piece, one trickled in many small
    pieces, one whose last piece carries the body, and a pipelined second request's head;
    a big body sent with its head in one piece is not mistaken for a big head."""
    rest = rest_server()
    start = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
    auth = f"Authorization: Bearer {rest.token()}\r\n".encode()
    # Trickled: 40 pieces of ~500 bytes, none of them over the cap on its own.
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        s.sendall(start)
        try:
            for i in range(40):
                s.sendall(f"X-Pad-{i}: {'a' * 480}\r\n".encode())
                time.sleep(0.005)
        except OSError:
            pass  # refused and closed mid-way
        resp = _reply(s)
    assert _status(resp) == 431 and "request headers over the limit" in _error(resp)
    # The last piece of an oversized head carries a small body too.
    pad = b"".join(f"X-Pad-{i}: {'b' * 480}\r\n".encode() for i in range(40))
    resp = _raw(rest.port, start + auth + pad + b"Content-Length: 2\r\n\r\n{}")
    assert _status(resp) == 431
    # A 300 KB binary body in the same piece as a small head is served.
    x = np.zeros((1200, 64), np.float32)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1200, 64],
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    body = head + x.tobytes()
    req = (start + auth + f"Inference-Header-Content-Length: {len(head)}\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)  # fmt: skip
    assert _status(_raw(rest.port, req)) == 200
    # Pipelined: a good request, then one with an oversized head, in one send: the
    # connection is refused with 431 (the first answer may be lost with it, as a
    # pipelining client must expect when the server closes).
    good = json.dumps(GOOD).encode()
    first = start + auth + f"Content-Length: {len(good)}\r\n\r\n".encode() + good
    resp = _raw(rest.port, first + start + pad + b"\r\n")
    assert b"HTTP/1.1 431" in resp and resp.count(b"HTTP/1.1 ") <= 2
    # The same pipelined head sent after the first answer arrived: refused as well.
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        s.sendall(first)
        assert _status(_reply(s)) == 200
        s.sendall(start + pad + b"\r\n")
        assert _status(_reply(s)) == 431
    _still_serving(rest)
