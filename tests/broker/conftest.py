"""A key broker running in a background thread on 127.0.0.1, and admin tokens for it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.broker.admin_client import BrokerAdmin
from sealserve.broker.app import BrokerServer, build_broker
from sealserve.broker.core import KeyBroker
from sealserve.broker.settings import ADMIN_AUDIENCE, ADMIN_TOS, BrokerSettings
from sealserve.enclave.simulated import DEFAULT_MEASUREMENT

ISSUER = "https://admin.example"
MASTER_HEX = "11" * 32
# The smallest policy set-policy accepts for the simulated platform: the platform, and
# its launch measurement (with roots=["unsafe-simulated"] at the broker).
PINNED_POLICY = (
    f'unsafe_allow_simulated = true\n[sev-snp]\nmeasurement = ["{DEFAULT_MEASUREMENT.hex()}"]\n'
)
SIM_POLICY = PINNED_POLICY
# A complete policy for genuine SEV-SNP (roots=["amd"]).
AMD_POLICY = f'platforms = ["sev-snp"]\n[sev-snp]\nmeasurement = ["{"ab" * 48}"]\n'


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Running:
    server: BrokerServer
    broker: KeyBroker
    settings: BrokerSettings
    loop: asyncio.AbstractEventLoop
    token: str
    issuer: TokenIssuer
    nonce_clock: FakeClock
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def ca_pem(self) -> bytes:
        return self.server.cert_pem

    def admin(self, token: str | None = None) -> BrokerAdmin:
        return BrokerAdmin(self.target, token=token or self.token, ca_pem=self.ca_pem)


@pytest.fixture(scope="session")
def admin_issuer(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenIssuer, Path]:
    pem, jwks = generate_keypair("ES256")
    path = tmp_path_factory.mktemp("admin-jwks") / "jwks.json"
    path.write_text(json.dumps(jwks))
    return TokenIssuer.from_pem(pem, issuer=ISSUER, audience=ADMIN_AUDIENCE), path


def admin_token(issuer: TokenIssuer, *, scopes: tuple[str, ...] = ("admin",)) -> str:
    return issuer.issue("owner", tier="admin", scopes=scopes, tos_version=ADMIN_TOS, ttl=600)


def broker_settings(
    tmp_path: Path, jwks: Path, sim_root: Path | None, **overrides: Any
) -> BrokerSettings:
    values: dict[str, Any] = {
        "port": 0,
        "store_file": tmp_path / "keys.sealed",
        "master_key": MASTER_HEX,
        "admin": {"issuer": ISSUER, "jwks_file": jwks},
        "unsafe_simulated_root_dir": sim_root,
    }
    return BrokerSettings.load(None, **{**values, **overrides})


@pytest.fixture
def start_broker(
    tmp_path: Path, sim_root: Path, admin_issuer: tuple[TokenIssuer, Path]
) -> Iterator[Any]:
    started: list[tuple[Running, threading.Thread]] = []
    issuer, jwks = admin_issuer

    def _start(**overrides: Any) -> Running:
        settings = broker_settings(tmp_path, jwks, sim_root, **overrides)
        clock = FakeClock()
        broker = build_broker(settings, nonce_clock=clock)
        server = BrokerServer(settings, broker=broker)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        box: dict[str, BaseException] = {}

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:
                box["error"] = exc
                ready.set()
                return
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        ready.wait(30)
        if "error" in box:
            raise box["error"]
        running = Running(server, broker, settings, loop, admin_token(issuer), issuer, clock)
        started.append((running, thread))
        return running

    yield _start
    for running, thread in started:
        asyncio.run_coroutine_threadsafe(running.server.stop(0), running.loop).result(30)
        running.loop.call_soon_threadsafe(running.loop.stop)
        thread.join(30)


@pytest.fixture
def hpke_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()
