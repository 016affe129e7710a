"""Detection beside the request path (`[defense] detection_mode = "beside"`): an attacker
who sends one request after another gets no more answers than with detection on the
request path (the next admission waits for the verdict the last rows earned), and every
answer still has its query record, with the detectors' flags, in the audit log."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve import demo
from sealserve.auth import TokenIssuer
from sealserve.client import Client
from sealserve.defense.audit.log import log_files
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)
from tests.server.test_defenses_rpc import TOS
from tests.server.test_front_door import _start

REFUSED = (RateLimitedError, ChallengeRequiredError, PermissionDeniedError, SuspendedError)


def _serve(
    start_server: Any, tmp: Path, sim_root: Path, mode: str, store: str = "memory:"
) -> tuple[Any, TokenIssuer]:
    tmp.mkdir()
    return _start(start_server, tmp, sim_root, state_store=store.format(tmp=tmp),
                  detection_mode=mode)  # fmt: skip


def _sweep(running: Any, issuer: TokenIssuer, rows: np.ndarray) -> int | None:
    """Uniform-noise rows one request at a time; the index of the first refusal."""
    token = issuer.issue("thief", tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)
    with Client(running.target, unsafe_plaintext=True, token=token,
                solve_challenges=False) as thief:  # fmt: skip
        for i, row in enumerate(rows):
            try:
                thief.infer("digits", {"input": row[None, :]})
            except REFUSED:
                return i
    return None


@pytest.mark.parametrize("store", ["memory:", "sqlite://{tmp}/state.db"])
def test_a_sequential_thief_is_stopped_at_the_same_request_either_way(
    start_server: Any, tmp_path: Path, sim_root: Path, store: str
) -> None:
    rows = np.random.default_rng(7).uniform(0, 16, (300, 64)).astype(np.float32)
    stopped = {}
    for mode in ("inline", "beside"):
        running, issuer = _serve(start_server, tmp_path / mode, sim_root, mode, store)
        worker = running.server.plane.guard.output.worker
        assert (worker is not None) == (mode == "beside")
        if worker is not None:
            # A slow worker (a store far away): the next request arrives before the
            # verdict is written, and its admission must wait for it.
            observe = worker._observe

            def slow(group: Any, observe: Any = observe) -> None:
                time.sleep(0.02)
                observe(group)

            worker._observe = slow
        stopped[mode] = _sweep(running, issuer, rows)
        status = running.server.plane.guard.quota.status("thief")
        assert status.set_by == "detector" and status.kind.value != "normal", (mode, status)
    assert stopped["inline"] is not None and stopped["inline"] < 200
    assert stopped["beside"] == stopped["inline"], stopped


@pytest.mark.parametrize("mode", ["inline", "beside"])
def test_every_answer_has_its_query_record(
    start_server: Any, tmp_path: Path, sim_root: Path, mode: str
) -> None:
    running, issuer = _serve(start_server, tmp_path / "s", sim_root, mode)
    x, _ = demo.holdout()
    token = issuer.issue("honest", tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)
    with Client(running.target, unsafe_plaintext=True, token=token) as honest:
        for i in range(40):
            honest.infer("digits", {"input": x[i : i + 1]})
        honest.infer("digits", {"input": x[:3]})  # a small batch goes beside too
    output = running.server.plane.guard.output
    queued = running.server.metrics.registry.get_sample_value("sealserve_detection_queued_rows")
    assert (queued is not None) == (mode == "beside")
    if output.worker is not None:
        output.worker.drain()  # what the loop has not observed yet
        assert running.server.metrics.registry.get_sample_value(
            "sealserve_detection_queued_rows") == 0  # fmt: skip
    queries = [
        json.loads(line)
        for f in log_files(tmp_path / "s" / "audit")
        for line in f.read_text().splitlines()
        if '"kind":"query"' in line
    ]
    mine = [q for q in queries if q["account"] == "honest"]
    assert len(mine) == 41
    assert all("distribution" in q["flags"] and "prada" in q["flags"] for q in mine)
    assert [q["time"] for q in mine] == sorted(q["time"] for q in mine)
