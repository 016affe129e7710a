"""The output defenses through the server: honest users get useful (perturbed) answers,
an extraction account is flagged and throttled on every replica's shared store, the
watermark ledger is sealed, and the audit log verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve import demo
from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.defense.audit.log import load_public_key, log_files, public_key_fingerprint
from sealserve.defense.audit.verify import verify_audit_log
from sealserve.errors import (
    ChallengeRequiredError,
    PermissionDeniedError,
    RateLimitedError,
    SuspendedError,
)

ISS, AUD, TOS = "https://issuer.test.invalid", "sealserve-test", "2026-11"


def _defense(tmp: Path, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "audit": {"dir": str(tmp / "audit"), "checkpoint_every": 50},
        "profiles": {
            "digits": {"noise": {"dist": "laplace", "scale": 0.02}, "renormalise": True,
                       "preserve_top1": True, "round": 3, "coarsen": {"input_scale": 16},
                       "watermark": {"fraction": 0.05}},
        },
        "models": {"digits": {"output": "probabilities", "label": "label", "profile": "digits",
                              "reference": str(demo.reference_path())}},
    }  # fmt: skip
    d.update(over)
    return d


@pytest.fixture
def defended(start_server: Any, tmp_path: Path, sim_root: Path) -> tuple[Any, TokenIssuer]:
    pem, jwks = generate_keypair("ES256")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    auth = {"audience": AUD, "required_tos_version": TOS,
            "issuers": [{"issuer": ISS, "jwks_file": str(tmp_path / "jwks.json")}]}  # fmt: skip
    running = start_server(
        model_repository=demo.repository(),
        unsafe_plaintext=True,
        auth=auth,
        attestation_platform="simulated",
        simulated_platform_dir=sim_root,
        state_store="memory:",
        limits={"tiers": {"standard": {"rate": 1000, "burst": 1000, "per_day": 100000}}},
        defense=_defense(tmp_path),
    )
    return running, TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)


def _token(issuer: TokenIssuer, account: str) -> str:
    return issuer.issue(account, tier="standard", scopes=["infer"], tos_version=TOS, ttl=600)


def test_honest_served_attacker_throttled_audit_verifies(defended: Any, tmp_path: Path) -> None:
    running, issuer = defended
    x, _ = demo.holdout()
    raw = running.server.engine.resolve("digits").session.run(None, {"input": x})[1]
    agree = 0
    with Client(running.target, unsafe_plaintext=True, token=_token(issuer, "honest")) as honest:
        for i in range(200):
            out = honest.infer("digits", {"input": x[i : i + 1]})
            p = out["probabilities"][0]
            assert abs(float(p.sum()) - 1.0) < 1e-2  # still a probability vector (rounded to 3)
            assert int(out["label"][0]) == int(np.argmax(p))  # label follows the answer
            agree += int(np.argmax(p) == np.argmax(raw[i]))
        # Answers are perturbed (not the raw model output) but useful.
        last = honest.infer("digits", {"input": x[:1]})["probabilities"][0]
        assert not np.allclose(last, raw[0], atol=1e-6)
    # preserve_top1 keeps every label except on watermarked answers (5% here, high on
    # purpose so the ledger fills): exactly those may disagree.
    marked = len(running.server.defense_secrets.ledger.entries(account="honest"))
    assert 0 < marked < 40
    assert agree >= 200 - marked
    rng = np.random.default_rng(0)
    refused_at = None
    with Client(running.target, unsafe_plaintext=True, token=_token(issuer, "thief"),
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
    status = running.server.plane.guard.quota.status("thief")
    assert status.kind.value in ("throttled", "challenged", "suspended")
    assert status.set_by == "detector" and "distribution" in status.reason.lower()
    # The honest account is still served after the attack.
    with Client(running.target, unsafe_plaintext=True, token=_token(issuer, "honest")) as honest:
        assert honest.infer("digits", {"input": x[:1]})["label"].shape == (1,)
    # The audit log verifies against the key in the attested runtime keys record (the
    # manifest names no first-start secret: `sealserve measure` reproduces it).
    audit = running.server.plane.guard.output.audit
    audit.checkpoint_at_time(__import__("time").time())
    pub = load_public_key((tmp_path / "state" / "audit-public.pem").read_bytes())
    assert running.server.runtime_keys.audit_public_key == pub
    assert running.server.runtime_keys.audit_fingerprint == public_key_fingerprint(pub)
    assert "audit_public_key" not in json.loads(running.server.manifest.to_bytes())["extra"]
    report = verify_audit_log(log_files(tmp_path / "audit"), trusted_public_keys=[pub])
    assert report.ok
    # Watermarked answers were recorded in the sealed ledger.
    ledger = running.server.defense_secrets.ledger
    assert len(ledger.entries()) > 0
    running.server.defense_secrets.save_ledger()
    sealed = (tmp_path / "state" / "watermark-ledger").read_bytes()
    assert sealed[:8] == b"SEALSTAT"


def test_bad_defense_config_is_refused_at_start(start_server: Any, tmp_path: Path) -> None:
    from sealserve.errors import ConfigError

    bad = _defense(tmp_path)
    bad["profiles"]["digits"]["top_k"] = 20  # more than the 10 classes
    with pytest.raises(ConfigError, match="top_k"):
        start_server(model_repository=demo.repository(), unsafe_plaintext=True, defense=bad,
                     state_store="memory:")  # fmt: skip
    with pytest.raises(ConfigError, match="unknown profile"):
        start_server(model_repository=demo.repository(), unsafe_plaintext=True,
                     state_store="memory:", defense=_defense(tmp_path, models={"digits": {"output": "probabilities",
                                                                   "profile": "nope"}}))  # fmt: skip
