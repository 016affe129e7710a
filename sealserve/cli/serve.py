"""``sealserve serve``: run the inference server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("sealserve.server")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the inference server",
        description=(
            "Serve the models of a repository over the Open Inference Protocol (gRPC). "
            "Settings come from --config (TOML) and SEALSERVE_* environment variables; "
            "see the README's config reference."
        ),
    )
    p.add_argument("--config", type=Path, help="server settings (TOML)")
    p.add_argument("--host", help="override 'host'")
    p.add_argument("--port", type=int, help="override 'port' (0 picks a free port)")
    p.add_argument("--model-repository", type=Path, help="override 'model_repository'")
    p.add_argument(
        "--ready-file",
        type=Path,
        help="write {host, port, tls_cert_pem, pid} as JSON here once serving (with "
        "workers: once every worker serves, and their pids under 'workers')",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from sealserve.server.app import serve
    from sealserve.server.logs import configure
    from sealserve.server.settings import Settings

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.model_repository is not None:
        overrides["model_repository"] = args.model_repository
    settings = Settings.load(args.config, **overrides)
    configure(settings.log_format, settings.log_level)
    count = settings.worker_count()
    if settings.workers == "auto":
        log.info("workers = auto: %d serving process(es)%s", count,
                 " (state_store memory: is per process)"
                 if settings.state_store.startswith("memory:") else "")  # fmt: skip
    if count == 1:
        asyncio.run(serve(settings, ready_file=args.ready_file))
        return 0
    from sealserve.server.workers import WorkerGroup

    if settings.defense is not None and settings.defense.detection_mode == "beside":
        log.warning(
            'detection_mode = "beside" with %d workers: an account waits for its own '
            "rows' verdict in the worker that queued them only; a client that opens a "
            "new connection may reach another worker a few milliseconds before that "
            "verdict (docs/detection-audit.md). Use workers = 1 where that matters.",
            count,
        )
    group = WorkerGroup(settings, count)
    group.prepare()
    worker = group.fork()
    if worker is not None:  # a forked worker: serve, then exit here like any serve
        worker.serve()
        return 0
    return group.supervise(args.ready_file)
