"""Quotas that hold across replicas, on the wire: exactness with two server processes
sharing Redis or SQLite, persistence across restarts, fail-closed on a store outage,
graduated responses, and `sealserve stress`/`sealserve admin` as an owner runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.client import Client
from sealserve.defense.limits import LimitsConfig
from sealserve.errors import (
    ChallengeRequiredError,
    RateLimitedError,
    SuspendedError,
    UnavailableError,
)
from sealserve.redteam.stress import Endpoint, run_stress
from tests._redis import RedisServer
from tests.conftest import sealserve_cmd, sealserve_env, serve_until_ready

ISS, AUD, TOS = "https://issuer.test.invalid", "sealserve-test", "2026-11"
X = {"input": np.zeros((1, 64), np.float32)}


class Deployment:
    """Writes a config (auth + limits + store) and starts `sealserve serve` processes."""

    def __init__(self, tmp: Path, *, store: str, limits: str) -> None:
        import shutil

        from sealserve import demo

        self.tmp = tmp
        pem, jwks = generate_keypair("ES256")
        (tmp / "jwks.json").write_text(json.dumps(jwks))
        (tmp / "issuer.pem").write_bytes(pem)
        self.issuer = TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)
        if not (tmp / "models").exists():
            shutil.copytree(demo.repository(), tmp / "models")
        self.config = tmp / "sealserve.toml"
        self.config.write_text(
            'model_repository = "models"\nport = 0\nunsafe_plaintext = true\n'
            f'log_format = "text"\nattestation_platform = "none"\nstate_store = "{store}"\n'
            f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
            f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n' + limits
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def token(self, account: str, tier: str = "t", scopes: tuple[str, ...] = ("infer",)) -> str:
        return self.issuer.issue(account, tier=tier, scopes=list(scopes), tos_version=TOS, ttl=900)

    def start(self) -> str:
        self.started += 1
        proc, info = serve_until_ready(self.config, self.tmp / f"ready-{self.started}.json")
        self.procs.append(proc)
        return f"127.0.0.1:{info['port']}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            p.wait(15)
        self.procs.clear()


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Any]:
    made: list[Deployment] = []

    def _make(**kw: Any) -> Deployment:
        d = Deployment(tmp_path, **kw)
        made.append(d)
        return d

    yield _make
    for d in made:
        d.stop()


QUOTA = 150
EXACT_LIMITS = f"[limits.tiers.t]\nper_day = {QUOTA}\n"


def _exactness(dep: Deployment) -> None:
    targets = [dep.start(), dep.start()]  # two replicas sharing one store
    accounts = {f"acct-{i}": dep.token(f"acct-{i}") for i in range(10)}
    tier = LimitsConfig.from_mapping({"tiers": {"t": {"per_day": QUOTA}}}).tier("t")
    report = asyncio.run(
        run_stress(
            [Endpoint(t, None) for t in targets], accounts, model="digits", inputs=X,
            connections=50, duration=10.0, tiers={a: tier for a in accounts},
        )
    )  # fmt: skip
    print(report.render())
    assert report.consistent, "admitted + refused must equal requests sent"
    assert report.over_admissions == 0
    for result in report.accounts.values():
        assert result.sent > QUOTA, "the load must exceed the quota for the test to mean anything"
        assert result.admitted == QUOTA, f"{result.account}: {result.admitted} admitted"
        assert set(result.refused) == {"RESOURCE_EXHAUSTED"}
        assert not result.errors


@pytest.mark.slow
def test_exact_across_two_processes_sharing_redis(deploy: Any, own_redis: RedisServer) -> None:
    # A server of its own: the deployment's keys use the default prefix and these account
    # names, so a shared server would carry another test's spent quota into this one.
    _exactness(deploy(store=own_redis.url, limits=EXACT_LIMITS))


@pytest.mark.slow
def test_exact_across_two_processes_sharing_sqlite(deploy: Any, tmp_path: Path) -> None:
    _exactness(deploy(store=f"sqlite://{tmp_path / 'state.db'}", limits=EXACT_LIMITS))


LEASED_LIMITS = "[limits]\nlease = true\nlease_s = 1.0\n" + EXACT_LIMITS


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_exact_across_two_processes_with_leases(
    deploy: Any, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The same, with quota leases: most admissions are local to a replica, and still
    every account gets exactly its quota across both."""
    if kind == "redis":
        store = request.getfixturevalue("own_redis").url  # fresh: see above
    else:
        store = f"sqlite://{tmp_path / 'state.db'}"
    _exactness(deploy(store=store, limits=LEASED_LIMITS))


def test_quota_survives_restart_sqlite(deploy: Any, tmp_path: Path) -> None:
    dep = deploy(store="sqlite://state.db", limits="[limits.tiers.t]\nper_day = 3\n")
    target = dep.start()
    with Client(target, unsafe_plaintext=True, token=dep.token("a")) as c:
        for _ in range(3):
            c.infer("digits", X)
        assert c.quota_remaining == 0
        assert c.quota is not None and c.quota.windows == {"account.day": (0, 3)}
    dep.stop()
    target = dep.start()
    with Client(target, unsafe_plaintext=True, token=dep.token("a")) as c:
        with pytest.raises(RateLimitedError) as info:
            c.infer("digits", X)
    assert "account daily quota of 3 requests exhausted" in info.value.message
    assert info.value.retry_after is not None and info.value.retry_after > 0


def test_fail_closed_when_redis_stops(deploy: Any, own_redis: RedisServer) -> None:
    dep = deploy(store=own_redis.url, limits="[limits.tiers.t]\nper_day = 1000\n")
    target = dep.start()
    with Client(target, unsafe_plaintext=True, token=dep.token("a"), timeout=10) as c:
        c.infer("digits", X)
        own_redis.stop()
        for _ in range(3):
            with pytest.raises(UnavailableError, match="state store unreachable"):
                c.infer("digits", X)
        own_redis.start()
        assert c.infer("digits", X)["label"].shape == (1,)


def test_graduated_responses_and_admin_cli(deploy: Any) -> None:
    dep = deploy(store="sqlite://state.db",
                 limits="[limits.tiers.t]\nrate = 20\nburst = 20\nper_day = 10000\n")  # fmt: skip
    target = dep.start()
    admin_token = dep.token("operator", scopes=("admin",))

    def admin(*args: str) -> str:
        out = subprocess.run(
            sealserve_cmd("admin", "--target", target, "--plaintext", *args),
            env={**sealserve_env(), "SEALSERVE_TOKEN": admin_token},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    with Client(target, unsafe_plaintext=True, token=dep.token("mallory")) as c:
        c.infer("digits", X)
        # Throttle: the rate drops to 10% (2/s) once the burst is spent.
        assert "throttled factor=0.1" in admin("throttle", "mallory", "--factor", "0.1",
                                               "--reason", "suspicious volume")  # fmt: skip
        refused = 0
        for _ in range(40):
            try:
                c.infer("digits", X)
            except RateLimitedError:
                refused += 1
        assert refused > 0
        # Challenge: the SDK solves the proof of work and is served; a client that
        # does not solve it is refused with a challenge to solve.
        assert "challenged difficulty=8" in admin("challenge", "mallory", "--difficulty", "8")
        admin("reset", "mallory", "--tier", "t")
        assert c.infer("digits", X)["label"].shape == (1,)
    with Client(
        target, unsafe_plaintext=True, token=dep.token("mallory"), solve_challenges=False
    ) as c:
        with pytest.raises(ChallengeRequiredError) as info:
            c.infer("digits", X)
        assert info.value.challenge.startswith("pow1.")
        # Suspend, then lift.
        assert "suspended" in admin("suspend", "mallory", "--reason", "extraction")
        with pytest.raises(SuspendedError, match="account is suspended"):
            c.infer("digits", X)
        report = admin("lift", "mallory", "--tier", "t")
        assert "account mallory: normal" in report and "extraction" in report  # history
        assert c.infer("digits", X)["label"].shape == (1,)


def test_admin_needs_admin_scope(deploy: Any) -> None:
    dep = deploy(store="memory:", limits="[limits.tiers.t]\nper_day = 10\n")
    target = dep.start()
    out = subprocess.run(
        sealserve_cmd("admin", "--target", target, "--plaintext", "suspend", "someone"),
        env={**sealserve_env(), "SEALSERVE_TOKEN": dep.token("x")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "admin" in out.stderr and "Traceback" not in out.stderr


def test_stress_cli_finds_no_over_admission(deploy: Any) -> None:
    dep = deploy(store="sqlite://state.db", limits="[limits.tiers.t]\nper_minute = 40\n")
    target = dep.start()
    out = subprocess.run(
        sealserve_cmd("stress", "--target", target, "--plaintext", "--config", str(dep.config),
                      "--issuer-key", str(dep.tmp / "issuer.pem"), "--issuer", ISS,
                      "--tier", "t", "--accounts", "4", "--connections", "8", "--duration", "3"),
        env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "over-admissions 0" in out.stdout
    assert "every request accounted for" in out.stdout
    assert "RESOURCE_EXHAUSTED" in out.stdout
