"""Audit logs written by several worker processes: one chain per writer.

A server with ``workers = 1`` writes its chain directly in ``[defense.audit] dir``. With
``workers = N`` each worker K writes its own chain in ``dir/worker-K/`` (one writer per
file), every chain signed by the same audit key. An auditor verifies each chain on its
own and reads their records together as one log (:func:`chains`).
"""

from __future__ import annotations

import re
from pathlib import Path

from sealserve.defense.audit.log import log_files

_WORKER_DIR = re.compile(r"^worker-([1-9][0-9]{0,2})$")


def worker_audit_dir(base: Path, worker: int | None) -> Path:
    """Where worker ``worker`` (1-based; None: a single-process server) writes its log."""
    return base if worker is None else base / f"worker-{worker}"


def chains(directory: Path) -> list[list[Path]]:
    """Each chain under ``directory``, its files in chain order: the directory's own
    files first (a single-process server's log, kept when it later ran workers), then
    each ``worker-K/`` in the order of K. Empty chains are left out."""
    found = [log_files(directory)]
    workers = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _WORKER_DIR.match(p.name)) is not None and p.is_dir()
    )
    found += [log_files(p) for _, p in workers]
    return [files for files in found if files]
