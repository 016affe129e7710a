"""The sealserve client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak the Open Inference Protocol to any OIP server. By default they **verify,
then trust**: before any token or input is sent, the server's attestation evidence is
checked against ``policy`` (default: a real TEE, no debug) and the TLS key the channel
uses must be the one the evidence binds (see ``sealserve.client.attested``). Other
modes are explicit: ``root_certificates=`` pins a certificate without attestation;
``unsafe_plaintext=True`` turns TLS off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeGuard

import grpc
import numpy as np

from sealserve._proto import grpc_service_pb2 as pb
from sealserve._proto import grpc_service_pb2_grpc as pb_grpc
from sealserve.attestation.claims import Policy
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.client.attested import ATTESTED_NAME, AttestedEndpoint, attest
from sealserve.client.codec import decode_response, encode_request
from sealserve.client.errors import from_rpc_error
from sealserve.client.quota import QUOTA_KEY, PowPaid, QuotaLeft
from sealserve.client.rest import RestCalls, RestConnection, pinned_context
from sealserve.errors import ChallengeRequiredError

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


def _payable(error: Exception) -> TypeGuard[ChallengeRequiredError]:
    """A challenge the client can solve and retry once (never a second time)."""
    return isinstance(error, ChallengeRequiredError) and bool(error.challenge)


def _pow_metadata(challenge: str, answer: str) -> tuple[tuple[str, str], ...]:
    return (("sealserve-pow-challenge", challenge), ("sealserve-pow-solution", answer))


def _credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class Client:
    """Blocking OIP client.

    ``target`` is ``host:port``. With neither ``root_certificates`` nor
    ``unsafe_plaintext``, the constructor attests the server against ``policy`` (a
    policy object or TOML file; default policy when None) and ``roots`` (default: AMD's
    pinned roots) and raises an AttestationError naming the failed check, before any
    token or data is sent. ``attestation`` then holds the verified claims.
    ``root_certificates`` (PEM) pins a certificate without attestation;
    ``unsafe_plaintext=True`` talks without TLS (local experiments only).
    ``token`` is a JWT or a callable returning a current one (see RefreshingToken).
    ``solve_challenges``: when the server demands proof of work, solve it and retry
    (``pow_paid`` counts what that cost).
    ``protocol``: "grpc" (default) or "http": ``target`` is then the REST port, the
    evidence comes from ``/v2/sealserve/evidence`` over TLS pinned to the certificate
    it binds, and ``model_metadata`` returns the JSON document (a dict).
    """

    def __init__(
        self,
        target: str,
        *,
        policy: Policy | str | Path | None = None,
        roots: TrustedRoots | None = None,
        root_certificates: bytes | None = None,
        token: TokenSource = None,
        unsafe_plaintext: bool = False,
        timeout: float = 30.0,
        server_hostname: str = "localhost",
        solve_challenges: bool = True,
        protocol: Literal["grpc", "http"] = "grpc",
    ) -> None:
        self._rest: RestCalls | None = None
        if protocol == "http":
            connection, self.attestation = open_rest(
                target, policy=policy, roots=roots, root_certificates=root_certificates,
                unsafe_plaintext=unsafe_plaintext, timeout=timeout,
                server_hostname=server_hostname,
            )  # fmt: skip
            self._rest = RestCalls(connection, token=token, solve_challenges=solve_challenges)
            self.pow_paid = self._rest.pow_paid
            self._token = token
            self._timeout = timeout
            return
        if protocol != "grpc":
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol[:16]!r}")
        self._channel, self.attestation = open_channel(
            target,
            policy=policy,
            roots=roots,
            root_certificates=root_certificates,
            unsafe_plaintext=unsafe_plaintext,
            timeout=timeout,
            server_hostname=server_hostname,
        )
        self._stub: Any = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._token = token
        self._timeout = timeout
        self.solve_challenges = solve_challenges
        self.pow_paid = PowPaid()
        self._quota: QuotaLeft | None = None

    @property
    def channel(self) -> grpc.Channel:
        """The verified channel, for other sealserve services (admin); gRPC only."""
        if self._rest is not None:
            raise ValueError("an HTTP client has no gRPC channel (protocol='http')")
        return self._channel

    @property
    def quota(self) -> QuotaLeft | None:
        """Each limit window's (remaining, limit), as the server reported them with the
        last successful call; ``None`` before one, or when no limit applies."""
        return self._rest.quota if self._rest is not None else self._quota

    @property
    def quota_remaining(self) -> int | None:
        """Calls left before a limit refuses (the smallest window's remaining)."""
        quota = self.quota
        return quota.remaining if quota is not None else None

    def _call(self, method: str, request: Any, extra: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            response, call = getattr(self._stub, method).with_call(
                request, timeout=self._timeout, metadata=_metadata(self._token) + extra
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if self.solve_challenges and not extra and _payable(error):
                # The server wants proof of work with each call: pay it and retry once.
                answer = self.pow_paid.pay(error.challenge)
                return self._call(
                    method,
                    request,
                    _pow_metadata(error.challenge, answer),
                )
            raise error from exc
        for key, value in call.trailing_metadata() or ():
            if key == QUOTA_KEY:
                self._quota = QuotaLeft.from_header(value)
        return response

    def server_ready(self) -> bool:
        if self._rest is not None:
            return self._rest.server_ready()
        return bool(self._call("ServerReady", pb.ServerReadyRequest()).ready)

    def model_ready(self, model: str, version: str = "") -> bool:
        if self._rest is not None:
            return self._rest.model_ready(model, version)
        return bool(
            self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version)).ready
        )

    def model_metadata(self, model: str, version: str = "") -> Any:
        if self._rest is not None:
            return self._rest.model_metadata(model, version)
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
        if self._rest is not None:
            return self._rest.infer(model, inputs, version=version, outputs=outputs)
        req = encode_request(model, inputs, version=version, outputs=outputs)
        return decode_response(self._call("ModelInfer", req))

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()
            return
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`, with the same surface (awaitable).

    Attestation (the default mode) happens on ``await connect()`` or on the first call.
    """

    def __init__(
        self,
        target: str,
        *,
        policy: Policy | str | Path | None = None,
        roots: TrustedRoots | None = None,
        root_certificates: bytes | None = None,
        token: TokenSource = None,
        unsafe_plaintext: bool = False,
        timeout: float = 30.0,
        server_hostname: str = "localhost",
        solve_challenges: bool = True,
    ) -> None:
        self._target = target
        self._policy = policy
        self._roots = roots
        self._root_certificates = root_certificates
        self._unsafe_plaintext = unsafe_plaintext
        self._server_hostname = server_hostname
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._token = token
        self._timeout = timeout
        self.attestation: AttestedEndpoint | None = None
        self._lock = asyncio.Lock()
        self.solve_challenges = solve_challenges
        self.pow_paid = PowPaid()
        self.quota: QuotaLeft | None = None

    async def connect(self) -> None:
        """Attest (unless pinned or plaintext) and open the channel. Idempotent."""
        async with self._lock:
            if self._channel is not None:
                return
            loop = asyncio.get_running_loop()
            creds, options, self.attestation = await loop.run_in_executor(
                None,
                lambda: _plan(
                    self._target, policy=self._policy, roots=self._roots,
                    root_certificates=self._root_certificates,
                    unsafe_plaintext=self._unsafe_plaintext, timeout=self._timeout,
                    server_hostname=self._server_hostname,
                ),
            )  # fmt: skip
            if creds is None:
                channel = grpc.aio.insecure_channel(self._target, options=options)
            else:
                channel = grpc.aio.secure_channel(self._target, creds, options=options)
            self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
            self._channel = channel

    async def _call(
        self, method: str, request: Any, extra: tuple[tuple[str, str], ...] = ()
    ) -> Any:
        if self._channel is None:
            await self.connect()
        call = getattr(self._stub, method)(
            request, timeout=self._timeout, metadata=_metadata(self._token) + extra
        )
        try:
            response = await call
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if self.solve_challenges and not extra and _payable(error):
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(None, self.pow_paid.pay, error.challenge)
                return await self._call(method, request, _pow_metadata(error.challenge, answer))
            raise error from exc
        for key, value in await call.trailing_metadata() or ():
            if key == QUOTA_KEY:
                self.quota = QuotaLeft.from_header(value)
        return response

    @property
    def quota_remaining(self) -> int | None:
        """Calls left before a limit refuses (the smallest window's remaining)."""
        return self.quota.remaining if self.quota is not None else None

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
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _plan(
    target: str,
    *,
    policy: Policy | str | Path | None,
    roots: TrustedRoots | None,
    root_certificates: bytes | None,
    unsafe_plaintext: bool,
    timeout: float,
    server_hostname: str,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str | int]], AttestedEndpoint | None]:
    """(credentials or None for plaintext, channel options, attestation): attests the
    server (blocking) unless a certificate is pinned or TLS is off."""
    options: list[tuple[str, str | int]] = [*_OPTIONS]
    if unsafe_plaintext:
        return None, options, None
    endpoint = None
    pem, name = root_certificates, server_hostname
    if pem is None:
        endpoint = attest(target, policy=policy, roots=roots, timeout=timeout)
        pem, name = endpoint.certificate_pem, ATTESTED_NAME
    options.append(("grpc.ssl_target_name_override", name))
    return _credentials(pem), options, endpoint


def open_rest(
    target: str,
    *,
    policy: Policy | str | Path | None = None,
    roots: TrustedRoots | None = None,
    root_certificates: bytes | None = None,
    unsafe_plaintext: bool = False,
    timeout: float = 30.0,
    server_hostname: str = "localhost",
) -> tuple[RestConnection, AttestedEndpoint | None]:
    """A connection to a REST port: attested (default), pinned, or plaintext (see Client)."""
    if unsafe_plaintext:
        return RestConnection(target, context=None, timeout=timeout), None
    endpoint = None
    pem, name = root_certificates, server_hostname
    if pem is None:
        endpoint = attest(target, policy=policy, roots=roots, timeout=timeout, protocol="http")
        pem, name = endpoint.certificate_pem, ATTESTED_NAME
    connection = RestConnection(
        target, context=pinned_context(pem), server_name=name, timeout=timeout
    )
    return connection, endpoint


def open_channel(
    target: str,
    *,
    policy: Policy | str | Path | None = None,
    roots: TrustedRoots | None = None,
    root_certificates: bytes | None = None,
    unsafe_plaintext: bool = False,
    timeout: float = 30.0,
    server_hostname: str = "localhost",
) -> tuple[grpc.Channel, AttestedEndpoint | None]:
    """A channel to ``target``: attested (default), pinned, or plaintext (see Client)."""
    creds, options, endpoint = _plan(
        target, policy=policy, roots=roots, root_certificates=root_certificates,
        unsafe_plaintext=unsafe_plaintext, timeout=timeout, server_hostname=server_hostname,
    )  # fmt: skip
    if creds is None:
        return grpc.insecure_channel(target, options=options), endpoint
    return grpc.secure_channel(target, creds, options=options), endpoint
