"""The transport-free core the gRPC servicer calls: metadata, readiness, inference.

Later layers (authentication, the defense guard) hook in here, not in the servicer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sealserve import __version__
from sealserve.defense.guard import Caller, Guard, ProofOfWork
from sealserve.defense.release.pipeline import OutputDefenses
from sealserve.defense.store.base import Remaining
from sealserve.errors import InputError, RateLimitedError, RefusedError, UnavailableError
from sealserve.server.engine import Engine, LoadedModel
from sealserve.server.types import InferRequest, InferResponse, ModelInfo

EXTENSIONS = ("model_repository_readonly",)
#: The retry hint (seconds) while models are loading or the server is stopping.
NOT_READY_RETRY_S = 2.0


class DataPlane:
    def __init__(
        self,
        engine: Engine,
        *,
        server_name: str,
        max_request_bytes: int,
        guard: Guard | None = None,
    ) -> None:
        self.engine = engine
        self.guard = guard or Guard()
        self.server_name = server_name
        self.max_request_bytes = max_request_bytes
        self._ready = False
        self.recent_refusals = RecentRefusals()

    def open(self, output: OutputDefenses | None) -> None:
        """The models have loaded: arm the guard with their output defenses (None: no
        [defense]) and start answering. The plane's one transition after it is built."""
        if output is not None:
            self.guard.arm(output)
        self._ready = True

    def close(self) -> None:
        """Stop answering (shutdown): calls get UNAVAILABLE with a retry hint."""
        self._ready = False

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready

    def model_ready(self, name: str, version: str) -> bool:
        return self._ready and self.engine.ready(name, version)

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return self.server_name, __version__, EXTENSIONS

    def model(self, name: str, version: str) -> LoadedModel:
        """Raises NotFoundError for an unknown model or version, and UnavailableError
        (with a retry hint) while the models are still loading."""
        if not self._ready:
            raise UnavailableError(
                "the server is loading its models (or stopping); retry shortly",
                retry_after=NOT_READY_RETRY_S,
                remedy="Retry after the time given in 'retry-after'.",
            )
        return self.engine.resolve(name, version)

    def model_metadata(self, name: str, version: str) -> ModelInfo:
        return self.model(name, version).info

    def infer_now(self, request: InferRequest) -> InferResponse | None:
        """:meth:`infer`'s answer computed at once, without a coroutine, where there is
        nothing to admit or release (no limits, no output defenses) and the model runs
        inline; None where :meth:`infer` must be awaited."""
        if not self.guard.idle:
            return None
        _batch_of(request)
        return self.engine.infer_inline(request)

    async def infer(
        self, request: InferRequest, caller: Caller, *, pow_: ProofOfWork | None = None
    ) -> tuple[InferResponse, tuple[Remaining, ...]]:
        """Admit (status, proof of work, limits), infer, release (output defenses).

        Raises the guard's refusals (RefusedError family, PermissionDeniedError,
        UnavailableError) before any inference runs.
        """
        # Decoded already: no deferred-decode wrapper (this is the REST port's path).
        if self.guard.idle:  # no limits, no output defenses: nothing to admit or release
            return (self.infer_now(request) or await self.engine.infer(request)), ()
        batch = _batch_of(request)
        requested = request.outputs
        to_compute = self.guard.to_compute(request.model, requested)
        remaining = await self._admit(caller, request.model, batch, pow_)
        response = await self._answer(request, caller, batch, requested, to_compute)
        return response, remaining

    async def infer_pending(
        self, pending: PendingRequest, caller: Caller, *, pow_: ProofOfWork | None = None
    ) -> tuple[InferResponse, tuple[Remaining, ...]]:
        """:meth:`infer` for a request whose tensors are not decoded yet: admission runs
        on the declared batch size first, so a refused caller's tensors are never
        materialised. (A declared batch below 1 is decoded first: decoding says what is
        wrong with it, or the batch check below does.)"""
        if self.guard.idle:  # no limits, no output defenses: nothing to admit or release
            return await self.infer(pending.decode(), caller, pow_=pow_)
        requested = pending.outputs
        # Which outputs are served is decided before admission: a request naming an
        # output the defenses do not cover is refused without spending quota.
        to_compute = self.guard.to_compute(pending.model, requested)
        request = None
        batch = pending.declared_batch
        if batch < 1:
            request = pending.decode()
            batch = _batch_of(request)
        remaining = await self._admit(caller, pending.model, batch, pow_)
        if request is None:
            request = pending.decode()
            if _batch_of(request) != batch:  # the codec checks shapes; never expected
                raise InputError("decoded batch size differs from the declared shape")
        if request.outputs != requested:  # both read the same request; never expected
            raise InputError("decoded outputs differ from the declared ones")
        response = await self._answer(request, caller, batch, requested, to_compute)
        return response, remaining

    async def _admit(
        self, caller: Caller, model: str, batch: int, pow_: ProofOfWork | None
    ) -> tuple[Remaining, ...]:
        try:
            return await self.guard.admit_async(caller, model, batch_size=batch, pow_=pow_)
        except RefusedError as exc:
            self.recent_refusals.remember(caller.account, exc)
            raise

    async def _answer(
        self, request: InferRequest, caller: Caller, batch: int,
        requested: tuple[str, ...], to_compute: tuple[str, ...],
    ) -> InferResponse:  # fmt: skip
        """Infer an admitted request and release its outputs through the defenses."""
        # A defended model always computes its defended output, whatever was asked for.
        request.outputs = to_compute
        response = await self.engine.infer(request)
        response.outputs = await self.guard.release_async(
            caller, request.model, request.inputs, response.outputs, requested=requested,
            rows=batch,
        )  # fmt: skip
        return response

    def refused_recently(self, account: str) -> None:
        """Raise the refusal this process gave ``account`` within the last
        :data:`REFUSAL_HOLD_S` seconds (never past its retry-after), if any: checked
        from the request's header before its body is read (no I/O). The refusal is
        audited like any other (the model is not known yet: its name is in the body)."""
        try:
            self.recent_refusals.check(account)
        except RefusedError as exc:
            self.guard.audit_refusal(Caller(account, None, ""), "", exc, 0, None)
            raise


@dataclass(frozen=True)
class PendingRequest:
    """A request admitted on what it declares (model, batch size, the outputs it names,
    already checked against the model's) before ``decode`` materialises its tensors."""

    model: str
    declared_batch: int
    decode: Callable[[], InferRequest]
    outputs: tuple[str, ...]
    """The output names asked for (empty: all)."""


def _batch_of(request: InferRequest) -> int:
    first = next(iter(request.inputs.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim else 1
    if batch < 1:
        raise InputError(
            f"input {next(iter(request.inputs))!r} has no rows (batch size 0): send at least one"
        )
    return batch


# How long a spent limit is answered from the request header alone: long enough that a
# client hammering with large bodies never gets one parsed on a loaded machine, short
# enough that a quota reset made through another replica is seen within it.
REFUSAL_HOLD_S = 5.0


class RecentRefusals:
    """Accounts refused in the last ``hold_s`` seconds, so that their next requests are
    refused before their bodies are read. Bounded; a lifted suspension or a reset quota
    is seen after at most ``hold_s``; each refusal comes from the store's own answer."""

    def __init__(
        self,
        *,
        hold_s: float = REFUSAL_HOLD_S,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hold = hold_s
        self._capacity = capacity
        self._clock = clock
        self._until: dict[str, tuple[float, float, RefusedError]] = {}

    def remember(self, account: str, exc: RefusedError) -> None:
        if not isinstance(exc, RateLimitedError):
            # Only spent limits: a lifted suspension or an answered challenge must
            # take effect at once.
            return
        if len(self._until) >= self._capacity:
            self._until.clear()
        now = self._clock()
        hold = self._hold if exc.retry_after is None else min(self._hold, exc.retry_after)
        self._until[account] = (now + hold, now, exc)

    def check(self, account: str) -> None:
        if not self._until:
            return
        entry = self._until.get(account)
        if entry is None:
            return
        until, at, exc = entry
        now = self._clock()
        if now >= until:
            del self._until[account]
            return
        retry = None if exc.retry_after is None else max(exc.retry_after - (now - at), 0.0)
        raise type(exc)(exc.message, retry_after=retry, remedy=exc.remedy)
