"""A sealserve Server running in a background thread, for synchronous clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealserve.server.app import Server
from sealserve.server.settings import Settings
from tests.server import models


@dataclass
class Running:
    server: Server
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_server() -> Iterator[Any]:
    started: list[tuple[Running, threading.Thread]] = []

    def _start(authenticator: Any = None, **overrides: Any) -> Running:
        if "auth" not in overrides and authenticator is None:
            overrides.setdefault("unsafe_disable_auth", True)
        settings = Settings.load(None, port=0, **overrides)
        loop = asyncio.new_event_loop()
        server_box: dict[str, Any] = {}
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                try:
                    server = Server(settings, authenticator=authenticator)
                    await server.start()
                    server_box["server"] = server
                except BaseException as exc:  # surfaced to the test below
                    server_box["error"] = exc
                finally:
                    ready.set()

            loop.run_until_complete(boot())
            if "server" in server_box:
                loop.run_forever()

        t = threading.Thread(target=main, daemon=True)
        t.start()
        ready.wait(60)
        if "error" in server_box:
            raise server_box["error"]
        running = Running(server_box["server"], server_box["server"].port, loop)
        started.append((running, t))
        return running

    yield _start
    for running, t in started:
        fut = asyncio.run_coroutine_threadsafe(running.server.stop(grace=0.5), running.loop)
        fut.result(30)
        running.loop.call_soon_threadsafe(running.loop.stop)
        t.join(30)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with the test models and the bundled demo model."""
    import shutil

    from sealserve import demo

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(demo.repository() / "digits", root / "digits")
    models.identity_all_types(root)
    models.two_inputs(root)
    models.failing_reshape(root)
    models.matmul(root, versions=(1, 2))
    (root / "matmul" / "config.toml").write_text(
        'version_policy = "all"\n[batching]\nmax_batch_size = 32\nmax_queue_delay_us = 2000\n'
    )
    return root
