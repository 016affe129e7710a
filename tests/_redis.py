"""A real redis-server on loopback for tests (a pytest plugin, see tests/conftest.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, without persistence unless
    ``persistence`` gives the arguments (e.g. the shipped manifest's)."""

    def __init__(
        self, workdir: Path, port: int | None = None, *, persistence: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.persistence = tuple(persistence) or ("--save", "", "--appendonly", "no")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.persistence,
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start on port {self.port}: "
                        f"{(self.workdir / 'redis.log').read_text(errors='replace')[-500:]}"
                    ) from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def crash(self) -> None:
        """SIGKILL: no shutdown, no final fsync (a node failure, an OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _need_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it via apt)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests isolate themselves by key prefix."""
    _need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may stop and restart."""
    _need_redis()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
