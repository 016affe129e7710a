"""The REST port: uvicorn (httptools) in the server's event loop, TLS from memory.

The TLS key is the gRPC port's in-memory key: ``ssl.SSLContext`` loads certificates
only from paths, so the PEM goes through an anonymous memory file (``memfd_create``,
close-on-exec) that is read once and closed; nothing touches a disk.

uvicorn times out idle keep-alive connections but not a client that sends its request
slowly (slow loris); :func:`_guarded_protocol` caps the size of request heads (431)
and a sweep puts a deadline on each head, then on each body (408), then closes the
connection. The sweep samples each connection's phase a few times per deadline, so
nothing is timed per request: a timer or a clock read per request costs more than the
rest of the guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sealserve.enclave.tls import TlsIdentity
from sealserve.server.rest.errors import error_body

log = logging.getLogger("sealserve.rest")


def ssl_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A server SSLContext holding ``identity``'s certificate and key, read from memory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    fd = os.memfd_create("sealserve-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, identity.cert_pem + b"\n" + identity.key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


def _canned(status: int, reason: str, message: str) -> bytes:
    body = error_body(message)
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


# The phases of a connection that have a deadline (GuardedProtocol.phase).
HEAD, BODY = 0, 1


def _guarded_protocol(max_header_bytes: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a size cap on request heads, and the state a
    sweep (:meth:`RestServer._sweep`) reads to put deadlines on heads and bodies."""
    size_reply = _canned(
        431, "Request Header Fields Too Large",
        f"request headers over the limit of {max_header_bytes} bytes",
    )  # fmt: skip

    class GuardedProtocol(HttpToolsProtocol):
        # Whether the next bytes belong to a request head (from the end of the last
        # message, or the connection's start, to the end of the head); the bytes
        # received while it is, and the size of the last chunk: the head is bounded
        # without a callback per header.
        _in_headers = True
        _header_bytes = 0
        _last_chunk = 0
        # Requests completed on this connection: names the head or body a deadline
        # is counting for. The sweep keeps its own (phase, since) per connection.
        _messages = 0
        sweep_key: int | None = None
        sweep_since = 0.0

        def refuse(self, reply: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

        def phase(self) -> int | None:
            """A key naming the phase with a deadline this connection is in (a head
            or a body, and which one), None when it has none: idle between requests
            (uvicorn's keep-alive timeout closes it), or waiting for its answer."""
            if not self._in_headers:
                return self._messages * 2 + BODY
            cycle = self.cycle
            if self.timeout_keep_alive_task is None and (cycle is None or cycle.response_complete):
                return self._messages * 2 + HEAD
            return None

        def data_received(self, data: bytes) -> None:
            n = len(data)
            self._last_chunk = n
            if self._in_headers:
                self._header_bytes += n
            HttpToolsProtocol.data_received(self, data)
            # Still in the head after this chunk: every byte counted was head.
            if self._in_headers and self._header_bytes > max_header_bytes:
                self.refuse(size_reply)

        def on_headers_complete(self) -> None:
            # The chunk that ended the head may carry body bytes as well (or began in
            # a previous body): measure the head itself when it could be over the cap.
            if self._header_bytes + self._last_chunk > max_header_bytes:
                size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
                if size > max_header_bytes:
                    self.refuse(size_reply)
                    raise ValueError("request headers too large")  # stops the parser
            self._in_headers = False
            HttpToolsProtocol.on_headers_complete(self)

        def on_message_complete(self) -> None:
            # What arrives next is the next request's head (pipelined or not).
            self._in_headers = True
            self._header_bytes = 0
            self._messages += 1
            HttpToolsProtocol.on_message_complete(self)

    return GuardedProtocol


class RestServer:
    """uvicorn serving ``app`` on ``host:port`` (0 = pick one) in the running loop."""

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        host: str,
        port: int,
        tls: TlsIdentity | None,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        keep_alive_s: int = 5,
        max_header_bytes: int = 16 * 1024,
        max_connections: int | None = 1000,
        reuse_port: bool = False,
    ) -> None:
        self._host = host
        self._reuse_port = reuse_port  # worker processes share the port
        self._port = port
        self._tls = tls
        self.port = 0
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            http=_guarded_protocol(max_header_bytes),
            log_config=None,
            access_log=False,
            server_header=False,
            # The peer address is the socket's: X-Forwarded-For counts only from the
            # operator's trusted_proxies, which the guard applies (defense/peer.py).
            # uvicorn would otherwise rewrite the client from it for any loopback peer.
            proxy_headers=False,
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=max_connections,
            ssl_context_factory=(lambda _c, _d: ssl_context(tls)) if tls is not None else None,
        )
        self._server = uvicorn.Server(self._config)
        self._sock: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._header_timeout = header_timeout_s
        self._body_timeout = body_timeout_s
        self._header_reply = _canned(
            408, "Request Timeout", f"request headers not received within {header_timeout_s:g} s"
        )
        self._body_reply = _canned(
            408, "Request Timeout", f"request body not received within {body_timeout_s:g} s"
        )
        self._sweep_s = min(max(min(header_timeout_s, body_timeout_s) / 5, 0.02), 1.0)

    async def start(self) -> int:
        """Bind and start serving. Returns the bound port."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)  # "off"
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only
        # when the listener says TCP (proto 0 costs a 40 ms Nagle/delayed-ACK stall).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(False)
        self._sock = sock
        await self._server.startup(sockets=[sock])
        self.port = sock.getsockname()[1]
        # uvicorn's tick keeps the Date header current; its signal handling stays out.
        self._ticker = asyncio.ensure_future(self._server.main_loop())
        self._sweeper = asyncio.ensure_future(self._sweep())
        log.info(
            "REST (OIP over HTTP) on %s:%d (%s)",
            self._host, self.port, "TLS" if self._tls is not None else "plaintext",
        )  # fmt: skip
        return self.port

    async def _sweep(self) -> None:
        """Refuse connections that stay in one request head or body past its deadline
        (408, then close). Sampled every ``_sweep_s``: a deadline counts from the
        sweep that first sees the phase, so it ends up to one sweep late; nothing is
        timed per request."""
        loop = asyncio.get_running_loop()
        connections = self._server.server_state.connections
        limits = {HEAD: self._header_timeout, BODY: self._body_timeout}
        replies = {HEAD: self._header_reply, BODY: self._body_reply}
        while True:
            await asyncio.sleep(self._sweep_s)
            now = loop.time()
            conn: Any  # a GuardedProtocol: uvicorn types its set by every protocol
            for conn in list(connections):
                try:
                    key = conn.phase()
                except Exception:  # uvicorn's internals moved: fail closed, loudly
                    log.exception("cannot tell a REST connection's phase; closing it")
                    conn.transport.close()
                    continue
                if key is None or key != conn.sweep_key:
                    conn.sweep_key, conn.sweep_since = key, now
                elif now - conn.sweep_since > limits[key % 2]:
                    conn.refuse(replies[key % 2])

    async def stop(self, grace: float = 5.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._ticker is None:
            return
        self._server.should_exit = True
        self._config.timeout_graceful_shutdown = max(1, int(grace))
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        await self._server.shutdown(sockets=[self._sock] if self._sock else None)
        self._ticker = None
