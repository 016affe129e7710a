"""Issue 16 (front-door): no side doors on the request path.

Every answer of a defended model passes the defenses whichever outputs the request
names; rows are counted and capped before inference; a large batch that trips
suspension is not answered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve import demo
from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.errors import (
    ChallengeRequiredError,
    InputError,
    PermissionDeniedError,
    RateLimitedError,
)
from tests.server.test_defenses_rpc import AUD, ISS, TOS, _defense

REFUSED = (RateLimitedError, ChallengeRequiredError, PermissionDeniedError)


def _start(start_server: Any, tmp: Path, sim_root: Path, *, limits: dict[str, Any] | None = None,
           **defense: Any) -> tuple[Any, TokenIssuer]:  # fmt: skip
    pem, jwks = generate_keypair("ES256")
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    auth = {"audience": AUD, "required_tos_version": TOS,
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp / "jwks.json")}]}  # fmt: skip
    running = start_server(
        model_repository=demo.repository(), unsafe_plaintext=True, auth=auth,
        attestation_platform="simulated", simulated_platform_dir=sim_root,
        state_store="memory:",
        limits=limits or {"tiers": {"standard": {"rate": 1000, "burst": 1000,
                                                 "per_day": 100000}}},
        defense=_defense(tmp, **defense),
    )  # fmt: skip
    return running, TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)


def _client(running: Any, issuer: TokenIssuer, account: str) -> Client:
    token = issuer.issue(account, tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)
    return Client(running.target, unsafe_plaintext=True, token=token, solve_challenges=False)


@pytest.mark.parametrize("outputs", [("label",), ("probabilities",), ("label", "probabilities")])
def test_every_output_combination_passes_the_same_defenses(
    start_server: Any, tmp_path: Path, sim_root: Path, outputs: tuple[str, ...]
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    rng = np.random.default_rng(7)
    rows = rng.uniform(0, 16, (200, 64)).astype(np.float32)
    refused_at = None
    with _client(running, issuer, "thief") as thief:
        for i in range(len(rows)):
            try:
                out = thief.infer("digits", {"input": rows[i : i + 1]}, outputs=outputs)
            except REFUSED:
                refused_at = i
                break
            assert set(out) == set(outputs)  # only what was asked for comes back
    # The same detector fires whatever the request names.
    assert refused_at is not None and refused_at < 200, f"{outputs}: never stopped"
    status = running.server.plane.guard.quota.status("thief")
    assert status.set_by == "detector" and "distribution" in status.reason.lower()
    # Marks are recorded for label-only answers too: the ledger holds exactly the rows
    # the keyed selection picks, whatever was asked for (marks do not depend on outputs).
    ledger = running.server.defense_secrets.ledger
    marked = ledger.entries(account="thief")
    assert len(marked) > 0
    # The audit log saw every answered row.
    audit = running.server.plane.guard.output.audit
    assert audit is not None


def test_label_only_answers_follow_the_defended_output(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    running, issuer = _start(start_server, tmp_path, sim_root)
    x, _ = demo.holdout()
    with _client(running, issuer, "honest") as c:
        both = c.infer("digits", {"input": x[:40]}, outputs=("label", "probabilities"))
        label = c.infer("digits", {"input": x[:40]}, outputs=("label",))
    # The label is the argmax of the perturbed answer (a watermarked row's label is the
    # mark), identical whether or not the probabilities were asked for.
    assert np.array_equal(label["label"], both["label"])
    assert np.array_equal(both["label"], np.argmax(both["probabilities"], axis=1))
    marked = running.server.defense_secrets.ledger.entries(account="honest")
    # 2 requests of the same 40 rows: the marked rows appear once per request.
    assert len(marked) % 2 == 0


def test_an_output_the_defenses_do_not_cover_is_refused(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    d = _defense(tmp_path)
    d["models"]["digits"].pop("label")  # 'label' is no longer covered
    running, issuer = _start(start_server, tmp_path, sim_root, models=d["models"])
    x, _ = demo.holdout()
    with _client(running, issuer, "someone") as c:
        with pytest.raises(InputError, match="'label' of model 'digits' is not covered"):
            c.infer("digits", {"input": x[:1]}, outputs=("label",))
        with pytest.raises(InputError, match="no-such-output|not an output|unknown"):
            c.infer("digits", {"input": x[:1]}, outputs=("no-such-output",))
        # The server keeps serving.
        assert c.infer("digits", {"input": x[:1]}, outputs=("probabilities",))


def test_unsafe_undefended_outputs_are_served_when_declared(
    start_server: Any, tmp_path: Path, sim_root: Path
) -> None:
    d = _defense(tmp_path)
    d["models"]["digits"].pop("label")
    d["models"]["digits"]["unsafe_undefended_outputs"] = ["label"]
    running, issuer = _start(start_server, tmp_path, sim_root, models=d["models"])
    x, _ = demo.holdout()
    with _client(running, issuer, "someone") as c:
        out = c.infer("digits", {"input": x[:3]}, outputs=("label",))
    assert set(out) == {"label"} and out["label"].shape == (3,)
