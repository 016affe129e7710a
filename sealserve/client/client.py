"""The sealserve client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak the Open Inference Protocol to any OIP server. TLS is on by default: pass
the server's certificate (``root_certificates``) or, once attestation is available,
a policy that the server's evidence must satisfy before any data is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from sealserve.client.codec import decode_response, encode_request
from sealserve.client.errors import from_rpc_error

TokenSource = str | Callable[[], str] | None

_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


def _metadata(token: TokenSource) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    value = token() if callable(token) else token
    return (("authorization", f"Bearer {value}"),)


def _credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class Client:
    """Blocking OIP client.

    ``target`` is ``host:port``. ``root_certificates`` (PEM) pins the server's TLS
    certificate; ``unsafe_plaintext=True`` talks without TLS (local experiments only).
    ``token`` is a JWT or a callable returning a current one.
    """

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes | None = None,
        token: TokenSource = None,
        unsafe_plaintext: bool = False,
        timeout: float = 30.0,
        server_hostname: str = "localhost",
    ) -> None:
        options: list[tuple[str, str | int]] = [*_OPTIONS]
        if unsafe_plaintext:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", server_hostname))
            self._channel = grpc.secure_channel(
                target, _credentials(root_certificates), options=options
            )
        self._stub: Any = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._token = token
        self._timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self._timeout, metadata=_metadata(self._token)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def server_ready(self) -> bool:
        return bool(self._call("ServerReady", pb.ServerReadyRequest()).ready)

    def model_ready(self, model: str, version: str = "") -> bool:
        return bool(
            self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version)).ready
        )

    def model_metadata(self, model: str, version: str = "") -> Any:
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str = "",
        outputs: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs``; returns the outputs by name."""
        req = encode_request(model, inputs, version=version, outputs=outputs)
        return decode_response(self._call("ModelInfer", req))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`, with the same surface (awaitable)."""

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes | None = None,
        token: TokenSource = None,
        unsafe_plaintext: bool = False,
        timeout: float = 30.0,
        server_hostname: str = "localhost",
    ) -> None:
        options: list[tuple[str, str | int]] = [*_OPTIONS]
        if unsafe_plaintext:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", server_hostname))
            self._channel = grpc.aio.secure_channel(
                target, _credentials(root_certificates), options=options
            )
        self._stub: Any = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._token = token
        self._timeout = timeout

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=self._timeout, metadata=_metadata(self._token)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def server_ready(self) -> bool:
        return bool((await self._call("ServerReady", pb.ServerReadyRequest())).ready)

    async def model_ready(self, model: str, version: str = "") -> bool:
        req = pb.ModelReadyRequest(name=model, version=version)
        return bool((await self._call("ModelReady", req)).ready)

    async def model_metadata(self, model: str, version: str = "") -> Any:
        return await self._call(
            "ModelMetadata", pb.ModelMetadataRequest(name=model, version=version)
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str = "",
        outputs: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        req = encode_request(model, inputs, version=version, outputs=outputs)
        return decode_response(await self._call("ModelInfer", req))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
