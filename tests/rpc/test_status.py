"""The one error adapter: what each error looks like on the wire, for server and broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from sealserve.errors import ConfigError, InputError, OverloadedError, RateLimitedError
from sealserve.rpc.status import grpc_errors, status_code, to_status


class _Aborted(Exception):
    pass


class FakeContext:
    """Records what an RPC was aborted with, as grpc.aio's context would send it."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.message = ""
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, meta: tuple[tuple[str, str], ...]) -> None:
        self.trailers = meta

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message
        raise _Aborted


class Service:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @grpc_errors
    async def Method(self, request: Any, context: grpc.aio.ServicerContext) -> str:
        raise self.exc


def _call(exc: BaseException) -> FakeContext:
    ctx = FakeContext()
    with pytest.raises(_Aborted):
        asyncio.run(Service(exc).Method(None, ctx))  # type: ignore[arg-type]
    return ctx


def test_a_config_error_is_the_operators_and_stays_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server's own configuration is not the client's business: INTERNAL, generic
    # text with an incident id, the detail only in the log (the broker turns policies
    # *sent by its admin* into InputError at its boundary, tests/broker/test_admin.py).
    with caplog.at_level(logging.ERROR, logger="sealserve.status"):
        ctx = _call(ConfigError("defense profile 'x': secret path /etc/keys"))
    assert ctx.code is grpc.StatusCode.INTERNAL
    assert ctx.message.startswith("internal error (incident ")
    assert "/etc/keys" not in ctx.message
    assert "/etc/keys" in caplog.text
    assert status_code(ConfigError("x")) is grpc.StatusCode.INTERNAL


def test_an_unexpected_error_never_sends_its_text() -> None:
    ctx = _call(RuntimeError("db password=hunter2"))
    assert ctx.code is grpc.StatusCode.INTERNAL
    assert "hunter2" not in ctx.message


def test_known_errors_carry_their_message_and_retry_after() -> None:
    ctx = _call(InputError("tensor 'x': bad shape"))
    assert (ctx.code, ctx.message) == (grpc.StatusCode.INVALID_ARGUMENT, "tensor 'x': bad shape")
    ctx = _call(RateLimitedError("rate limit", retry_after=2.2))
    assert ctx.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ctx.trailers == (("retry-after", "3"),)
    assert to_status(OverloadedError("queue full"))[2] == (("retry-after", "1"),)


def test_an_abort_the_method_made_passes_through_once() -> None:
    class Aborting:
        @grpc_errors
        async def Method(self, request: Any, context: grpc.aio.ServicerContext) -> str:
            raise grpc.aio.AbortError("already aborted")

    ctx = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(Aborting().Method(None, ctx))  # type: ignore[arg-type]
    assert ctx.code is None  # not aborted a second time
