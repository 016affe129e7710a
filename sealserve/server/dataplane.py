"""The transport-free core the gRPC servicer calls: metadata, readiness, inference.

Later layers (authentication, the defense guard) hook in here, not in the servicer.
"""

from __future__ import annotations

import asyncio
from functools import partial

from sealserve import __version__
from sealserve.defense.guard import Caller, Guard, ProofOfWork
from sealserve.defense.store.base import Remaining
from sealserve.errors import InputError
from sealserve.server.engine import Engine, LoadedModel
from sealserve.server.types import InferRequest, InferResponse, ModelInfo

EXTENSIONS = ("model_repository_readonly",)


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

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready

    def model_ready(self, name: str, version: str) -> bool:
        return self._ready and self.engine.ready(name, version)

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return self.server_name, __version__, EXTENSIONS

    def model(self, name: str, version: str) -> LoadedModel:
        """Raises NotFoundError for an unknown model or version."""
        return self.engine.resolve(name, version)

    def model_metadata(self, name: str, version: str) -> ModelInfo:
        return self.engine.resolve(name, version).info

    async def infer(
        self, request: InferRequest, caller: Caller, *, pow_: ProofOfWork | None = None
    ) -> tuple[InferResponse, tuple[Remaining, ...]]:
        """Admit (status, proof of work, limits), infer, release (output defenses).

        Raises the guard's refusals (RefusedError family, PermissionDeniedError,
        UnavailableError) before any inference runs.
        """
        first = next(iter(request.inputs.values()), None)
        batch = int(first.shape[0]) if first is not None and first.ndim else 1
        if batch < 1:
            raise InputError(
                f"input {next(iter(request.inputs))!r} has no rows (batch size 0): send at "
                "least one"
            )
        requested = request.outputs
        compute = self.guard.to_compute(request.model, requested)
        remaining = self.guard.admit(caller, request.model, batch_size=batch, pow_=pow_)
        request.outputs = compute
        response = await self.engine.infer(request)
        release = partial(self.guard.release, caller, request.model, request.inputs,
                          response.outputs, requested=requested)  # fmt: skip
        if self.guard.large_batch(batch):
            # A large batch is scored before it is answered: off the event loop.
            response.outputs = await asyncio.to_thread(release)
        else:
            response.outputs = release()
        return response, remaining
