"""The defenses fire over REST as over gRPC: the same guard sees the same account
whichever door it uses, perturbs the answers, and the audit log says which door."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sealserve import demo
from sealserve.client import Client
from sealserve.defense.audit.log import log_files
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)
from tests.server.test_defenses_rpc import _defense


def test_uniform_sweep_over_rest_is_stopped_and_audited(rest_server: Any, tmp_path: Path) -> None:
    rest = rest_server(
        model_repository=demo.repository(),
        state_store="memory:",
        limits={"tiers": {"standard": {"rate": 1000, "burst": 1000, "per_day": 100000}}},
        defense=_defense(tmp_path),
    )
    server = rest.running.server
    x, _ = demo.holdout()
    raw = server.engine.resolve("digits").session.run(None, {"input": x[:20]})[1]
    with Client(rest.target, protocol="http", unsafe_plaintext=True,
                token=rest.token("honest")) as honest:  # fmt: skip
        answers = [honest.infer("digits", {"input": x[i : i + 1]})["probabilities"][0]
                   for i in range(20)]  # fmt: skip
    # Perturbed (rounded to 3 places, keyed noise), not the raw model output.
    assert not np.allclose(np.stack(answers), raw, atol=1e-6)
    assert all(abs(float(p.sum()) - 1.0) < 1e-2 for p in answers)
    rng = np.random.default_rng(0)
    refused_at = None
    with Client(rest.target, protocol="http", unsafe_plaintext=True, token=rest.token("thief"),
                solve_challenges=False) as thief:  # fmt: skip
        for i in range(300):
            try:
                thief.infer("digits", {"input": rng.uniform(0, 16, (1, 64)).astype(np.float32)})
            except (
                RateLimitedError,
                ChallengeRequiredError,
                PermissionDeniedError,
                SuspendedError,
            ):
                refused_at = i
                break
    assert refused_at is not None and refused_at < 200, "the uniform sweep was never stopped"
    status = server.plane.guard.quota.status("thief")
    assert status.kind.value in ("throttled", "challenged", "suspended")
    assert status.set_by == "detector"
    # The same account is refused on the gRPC port too: one guard, one state.
    with Client(rest.running.target, unsafe_plaintext=True, token=rest.token("thief"),
                solve_challenges=False) as grpc_thief:  # fmt: skip
        try:
            grpc_thief.infer("digits", {"input": x[:1]})
            refused_on_grpc = False
        except (RateLimitedError, ChallengeRequiredError, PermissionDeniedError, SuspendedError):
            refused_on_grpc = True
    assert refused_on_grpc or status.kind.value == "throttled"
    # The honest account is still served over REST.
    r = httpx.post(
        f"http://{rest.target}/v2/models/digits/infer",
        json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                          "data": x[0].tolist()}]},
        headers=rest.headers("honest"), timeout=10,
    )  # fmt: skip
    assert r.status_code == 200
    # Every answered query is in the audit log, marked with the protocol that served it.
    audit = server.plane.guard.output.audit
    audit.checkpoint_at_time(__import__("time").time())
    records = [
        json.loads(line)
        for f in log_files(tmp_path / "audit")
        for line in f.read_text().splitlines()
    ]
    queries = [r for r in records if r["kind"] == "query"]
    assert {q["protocol"] for q in queries} == {"rest"}
    assert sum(q["account"] == "honest" for q in queries) == 21
    assert any(q["account"] == "thief" and q["decision"] not in ("ok", "log") for q in queries)


def test_an_output_refused_over_rest_costs_no_quota(rest_server: Any, tmp_path: Path) -> None:
    d = _defense(tmp_path)
    d["models"]["digits"].pop("label")  # 'label' is no longer covered
    rest = rest_server(
        model_repository=demo.repository(),
        state_store="memory:",
        limits={"tiers": {"standard": {"rate": 1000, "burst": 1000, "per_day": 100000}}},
        defense=d,
    )
    quota = rest.running.server.plane.guard.quota
    x, _ = demo.holdout()

    def infer(outputs: list[str]) -> httpx.Response:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 64],
                            "data": x[:5].ravel().tolist()}],
                "outputs": [{"name": n} for n in outputs]}  # fmt: skip
        return httpx.post(f"http://{rest.target}/v2/models/digits/infer", json=body,
                          headers=rest.headers("asker"), timeout=10)  # fmt: skip

    def spent() -> int:
        day = next(r for r in quota.usage("asker", "standard") if r.name == "account.day")
        return day.limit - day.remaining

    assert infer(["probabilities"]).status_code == 200
    assert spent() == 5
    for outputs in (["label"], ["no-such-output"], ["probabilities", "label"]):
        r = infer(outputs)
        assert r.status_code == 400, r.text
        assert "not covered" in r.text or "not an output" in r.text
        assert spent() == 5, outputs  # refused before admission: nothing charged
