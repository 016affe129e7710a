"""``workers = N``: N serving processes behind one port and one attested identity.

Where the fork sits in the one order (server/app.py): the parent runs the first half,
:meth:`Server.prepare` (authenticator, measured repository, platform, TLS key, sealed
defense secrets, runtime keys, manifest, the key-release key), and reserves the ports:
a socket bound with SO_REUSEPORT and never listening, so that port 0 resolves once for
every worker. Then it forks N workers while it holds no gRPC object, thread, store
connection or onnxruntime session (gRPC's fork guidance; checked before each fork).
Each worker runs the second half, :meth:`Server.start_prepared`: key wait, store and
guard, data plane, services, the same ports bound with SO_REUSEPORT (the kernel spreads
connections among them), models loaded, serving. Every worker therefore presents the
same certificate and the same evidence inputs; a client that pinned one reaches all.

One writer per file: worker K writes its audit chain in ``audit dir/worker-K/`` and its
sealed ledger in ``state_dir/watermark-ledger-worker-K``; workers share the state store.

Lifecycle: SIGTERM/SIGINT to the parent stops every worker gracefully. A worker that
exits on its own is logged; the parent stops the others and exits non-zero (a
supervisor restarts the pod); workers are never restarted one by one. The ready file is
written once every worker serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sealserve.enclave.hardening import harden_process
from sealserve.errors import ConfigError, CryptoError, SealserveError
from sealserve.server.app import Server, run_until_stopped
from sealserve.server.settings import Settings
from sealserve.server.startup import check_store

log = logging.getLogger("sealserve.server")

#: Seconds the parent waits for stopped workers before it kills them.
STOP_GRACE_S = 30.0


def reserve_port(settings: Settings, key: str, host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that never listens: it holds
    the port (and picks one for port 0) until the workers have bound it too.
    Raises ConfigError naming ``key`` when it cannot bind."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(
            f"{settings.where(key)}: cannot listen on {host}:{port}: {exc.strerror or exc}",
            remedy="Fix the host: an address of this machine or a name that resolves to one.",
        ) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{settings.where(key)}: cannot listen on {host}:{port}: the port is in use, "
            "or the address is not one of this machine's",
            remedy=f"Choose a free {key} (0 picks one), stop the process using it, or fix "
            "the host.",
        ) from exc
    return sock


@dataclass
class Worker:
    """One forked serving process (in the child)."""

    index: int
    server: Server
    ready_fd: int

    def serve(self) -> None:
        """Run the second half of the one order, report ready, serve until stopped."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        server = self.server
        server.become_worker(self.index)
        note: dict[str, object] = {"index": self.index, "pid": os.getpid()}
        failed = False
        try:
            await server.start_prepared()
            note["metrics_port"] = server.metrics_port
        except SealserveError as exc:
            # The parent says it once, as a single server's start would (every worker
            # meets the same error: N copies of the line would bury the fix).
            note.update(error=exc.message, remedy=exc.remedy,
                        usage=isinstance(exc, ConfigError | CryptoError))  # fmt: skip
            failed = True
        try:
            os.write(self.ready_fd, json.dumps(note).encode() + b"\n")
        finally:
            os.close(self.ready_fd)
        if failed:
            raise SystemExit(1)
        await run_until_stopped(server)


@dataclass
class WorkerGroup:
    """The parent of N workers: ``prepare()``, then ``fork()`` (returns the
    :class:`Worker` in a child, None in the parent), then ``supervise()``."""

    settings: Settings
    count: int
    server: Server | None = None
    _reserved: list[socket.socket] = field(default_factory=list)
    _children: dict[int, int] = field(default_factory=dict)  # pid -> index
    _pids: list[int] = field(default_factory=list)
    _ready_r: int = -1
    _metrics: dict[int, int] = field(default_factory=dict)  # worker index -> loopback port
    _stopping: bool = False
    _stop_at: float = 0.0
    _failure: dict[str, Any] | None = None

    def prepare(self) -> None:
        """Reserve the ports, harden this process, build the attested identity.
        Raises ConfigError as a single server's start would."""
        s = self.settings
        port = self._reserve("port", s.host, s.port)
        update: dict[str, object] = {"port": port}
        if s.rest is not None:
            rest_port = self._reserve("rest.port", s.rest.host, s.rest.port)
            update["rest"] = s.rest.model_copy(update={"port": rest_port})
        if s.health_port is not None:
            update["health_port"] = self._reserve("health_port", s.health_host, s.health_port)
        if s.metrics_port is not None:
            # The parent serves every worker's metrics here once they all serve.
            update["metrics_port"] = self._reserve("metrics_port", s.metrics_host, s.metrics_port)
        self.settings = s.model_copy(update=update)
        report = harden_process() if s.harden_process else None
        self.server = Server(self.settings, hardening=report)
        self.server.prepare(fork=True)
        self.server.before_fork()
        check_store(self.settings)  # one error line here, not one per worker
        log.info("workers: %d processes on %s:%d", self.count, s.host, port)

    def _reserve(self, key: str, host: str, port: int) -> int:
        sock = reserve_port(self.settings, key, host, port)
        self._reserved.append(sock)
        return int(sock.getsockname()[1])

    def fork(self) -> Worker | None:
        """Fork the workers. In a child: its :class:`Worker` (the caller serves with it
        and exits). In the parent: None, once all are forked.

        Raises RuntimeError when this process runs other threads (a fork would copy
        locks they hold; gRPC forbids forking once it has started).
        """
        assert self.server is not None, "prepare() first"
        self._ready_r, ready_w = os.pipe()
        for index in range(1, self.count + 1):
            check_single_threaded()
            pid = os.fork()
            if pid == 0:
                os.close(self._ready_r)
                for sock in self._reserved:
                    sock.close()
                if self.settings.harden_process:
                    harden_process()  # memory locks are not inherited across fork
                return Worker(index, self.server, ready_w)
            self._children[pid] = index
            self._pids.append(pid)
        os.close(ready_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("workers: %s, stopping every worker", signal.Signals(signum).name)
        self._stop_all()

    def _stop_all(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._stop_at = time.monotonic() + STOP_GRACE_S
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet
                os.kill(pid, signal.SIGTERM)

    def supervise(self, ready_file: Path | None = None) -> int:
        """Wait until every worker serves (then write ``ready_file`` and release the
        port reservations), then until they stop. Returns the exit code: 0 after a
        signal, else the first failed worker's code (1 when it was killed)."""
        server = self.server
        assert server is not None and self._children, "fork() first"
        ready: set[int] = set()
        pending = b""
        code = 0
        while self._children:
            if self._ready_r >= 0:
                readable, _, _ = select.select([self._ready_r], [], [], 0.2)
                if readable:
                    chunk = os.read(self._ready_r, 4096)
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for note in (json.loads(line) for line in lines if line):
                        if "error" in note:
                            self._failure = self._failure or note
                        else:
                            ready.add(int(note["index"]))
                            if note.get("metrics_port"):
                                self._metrics[int(note["index"])] = int(note["metrics_port"])
                    if not chunk:
                        os.close(self._ready_r)
                        self._ready_r = -1
                if len(ready) == self.count and not self._stopping:
                    self._serving(ready_file)
            else:
                time.sleep(0.2)
            code = self._reap(code, started=len(ready) == self.count)
        if self._failure is not None:
            # What the first worker met at start, as its own start would have said it.
            failure = self._failure
            cls = ConfigError if failure.get("usage") else SealserveError
            raise cls(str(failure["error"]), remedy=str(failure["remedy"]))
        return code

    def _serving(self, ready_file: Path | None) -> None:
        assert self.server is not None
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        s = self.settings
        if s.metrics_port is not None:
            from prometheus_client import CollectorRegistry

            from sealserve.server.metrics import WorkerMetrics, serve_registry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(WorkerMetrics(self._metrics))
            try:
                serve_registry(registry, host=s.metrics_host, port=s.metrics_port)
            except OSError as exc:
                self._failure = {
                    "error": f"cannot serve metrics on {s.metrics_host}:{s.metrics_port} "
                    f"({exc.strerror or exc})",
                    "remedy": "Choose a free metrics_port.",
                    "usage": True,
                }
                self._stop_all()
                return
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
        log.info("workers: all %d serving (pids %s)", self.count,
                 ", ".join(map(str, self._pids)))  # fmt: skip
        if ready_file is not None:
            server = self.server
            server.port = self.settings.port
            server.rest_port = self.settings.rest.port if self.settings.rest else 0
            server.metrics_port = self.settings.metrics_port
            server.write_ready_file(ready_file, workers=self._pids)

    def _reap(self, code: int, *, started: bool) -> int:
        """Collect exited workers; the first unexpected exit stops the rest."""
        while self._children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = self._children.pop(pid, None)
            if index is None:
                continue
            exit_code = os.waitstatus_to_exitcode(status)
            if not self._stopping:
                log.error("workers: worker %d (pid %d) exited with code %d %s; stopping the "
                          "others", index, pid, exit_code,
                          "while serving" if started else "while starting")  # fmt: skip
                code = exit_code if exit_code > 0 and not started else 1
                self._stop_all()
        if self._stopping and self._children and time.monotonic() > self._stop_at:
            for pid in self._children:
                log.error("workers: worker pid %d did not stop in %.0f s; killing it",
                          pid, STOP_GRACE_S)  # fmt: skip
                os.kill(pid, signal.SIGKILL)
            self._stop_at = float("inf")
        return code


def check_single_threaded() -> None:
    """Raise RuntimeError unless forking now is safe: no other Python thread runs, and
    onnxruntime is not imported (its import starts native threads that a forked child
    would inherit as dead handles and hang joining at exit). gRPC objects are ruled out
    by construction (``Server.prepare`` makes none); BLAS thread pools (OpenBLAS) stop
    and restart themselves around a fork (pthread_atfork)."""
    if threading.active_count() != 1:
        names = ", ".join(sorted(t.name for t in threading.enumerate()))
        raise RuntimeError(f"cannot fork workers: other threads are running ({names})")
    if "onnxruntime" in sys.modules:
        raise RuntimeError("cannot fork workers: onnxruntime is already imported")
