"""Detection with the detectors' state written behind (defense/detect/cache.py), on the
wire with two server processes sharing one SQLite store: a thief who alternates between
the replicas is still stopped on both, and a graceful stop leaves the replica's detector
state in the store."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from sealserve import demo
from sealserve.client import Client
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)
from tests.server.test_quota_rpc import deploy  # noqa: F401  (the fixture)

REFUSED = (RateLimitedError, ChallengeRequiredError, PermissionDeniedError, SuspendedError)


def _config(tmp: Path) -> str:
    return (
        "[limits.tiers.t]\nrate = 1000\nburst = 1000\nper_day = 100000\n"
        "[defense]\ndetector_state_flush_s = 60  # only the graceful stop writes it\n"
        f'[defense.audit]\ndir = "{tmp / "audit"}"\n'
        "[defense.models.digits]\n"
        'output = "probabilities"\nlabel = "label"\n'
        f'reference = "{demo.reference_path()}"\n'
    )


def test_a_thief_alternating_between_replicas_is_stopped_on_both(
    deploy: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    dep = deploy(store=f"sqlite://{tmp_path / 'state.db'}", limits=_config(tmp_path))
    targets = [dep.start(), dep.start()]
    token = dep.token("thief")
    rng = np.random.default_rng(1)
    clients = [Client(t, unsafe_plaintext=True, token=token, solve_challenges=False)
               for t in targets]  # fmt: skip
    refused_at = None
    try:
        for i in range(400):
            try:
                clients[i % 2].infer(
                    "digits", {"input": rng.uniform(0, 16, (1, 64)).astype(np.float32)}
                )
            except REFUSED:
                refused_at = i
                break
        assert refused_at is not None and refused_at < 300, "the alternating sweep ran on"
        # The status is shared: the other replica refuses the thief's next call too.
        other = clients[(refused_at + 1) % 2]
        try:
            other.infer("digits", {"input": rng.uniform(0, 16, (1, 64)).astype(np.float32)})
            raise AssertionError("the other replica answered a flagged thief")
        except REFUSED:
            pass
    finally:
        for c in clients:
            c.close()
    # A graceful stop writes what each replica held: the thief's state is in the store.
    dep.stop()
    with sqlite3.connect(tmp_path / "state.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        keys = [
            r[0]
            for t in tables
            for r in db.execute(f"SELECT * FROM {t}")  # noqa: S608 - names from sqlite_master
            if isinstance(r[0], str) and r[0].startswith("detect/") and "thief" in r[0]
        ]
    assert any(k.startswith("detect/distribution/digits/thief") for k in keys), keys
