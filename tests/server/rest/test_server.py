"""The REST port's server layer on its own: the peer address is the socket's."""

from __future__ import annotations

from typing import Any

import httpx

from sealserve.server.rest.server import RestServer


async def test_forwarded_for_does_not_replace_the_peer_address() -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body = str(scope["client"][0]).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    server = RestServer(echo, host="127.0.0.1", port=0, tls=None)
    port = await server.start()
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(
                f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": "10.1.2.3"}
            )
        assert r.text == "127.0.0.1"
    finally:
        await server.stop(0)
