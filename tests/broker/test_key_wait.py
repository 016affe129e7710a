"""A server waiting for its model key: it keeps waiting through anything transient
(broker down, restarting, TLS not verifying yet), with capped, jittered exponential
backoff; only a refusal or the operator's ``[key_broker] wait_s`` ends the wait."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealserve.enclave.key_release import fetch_model_key
from sealserve.enclave.model_file import generate_key
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.enclave.tls import TlsIdentity
from sealserve.errors import ConfigError, KeyReleaseError
from sealserve.server.model_keys import KeyBrokerSettings, KeyProvider, KeyRelease
from tests.broker.conftest import SIM_POLICY, Running

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]


class Stop(Exception):
    """Ends a wait that would otherwise go on for ever."""


def _dead_port() -> int:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeTime:
    """A clock that sleeping advances; stops the wait after ``limit`` sleeps."""

    def __init__(self, limit: int = 1000) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.limit = limit

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) >= self.limit:
            raise Stop


def _fetch(target: str, sim_root: Path, **kwargs: object) -> bytes:
    return fetch_model_key(
        target,
        key_id="k",
        tls_spki=b"spki",
        manifest=b"manifest",
        hpke_private_key=X25519PrivateKey.generate(),
        **{  # type: ignore[arg-type]
            "platform": SimulatedPlatform(sim_root),
            "broker_ca_pem": None,
            "timeout": 1.0,
            **kwargs,
        },
    )


def test_an_unreachable_broker_is_waited_for_without_end_backoff_capped(
    sim_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = FakeTime(limit=12)
    with pytest.raises(Stop):  # never a KeyReleaseError: no deadline was set
        _fetch(f"127.0.0.1:{_dead_port()}", sim_root, backoff=0.5, max_backoff=8,
               sleep=t.sleep, clock=t.clock, jitter=lambda: 1.0)  # fmt: skip
    assert t.sleeps == [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8]
    assert "waiting for key 'k': attempt 1, next in 0.5 s" in caplog.text
    assert "unavailable" in caplog.text


def test_the_backoff_is_jittered_within_the_upper_half(sim_root: Path) -> None:
    draws = iter([0.0, 0.5, 0.999, 0.25] * 10)
    t = FakeTime(limit=6)
    with pytest.raises(Stop):
        _fetch(f"127.0.0.1:{_dead_port()}", sim_root, backoff=1.0, max_backoff=4,
               sleep=t.sleep, clock=t.clock, jitter=lambda: next(draws))  # fmt: skip
    assert t.sleeps == pytest.approx([0.5, 1.5, 3.998, 2.5, 2.0, 3.0])


def test_wait_s_ends_the_wait_with_one_error_naming_the_key(sim_root: Path) -> None:
    t = FakeTime()
    with pytest.raises(KeyReleaseError) as info:
        _fetch(f"127.0.0.1:{_dead_port()}", sim_root, wait=20, backoff=1, max_backoff=4,
               sleep=t.sleep, clock=t.clock, jitter=lambda: 1.0)  # fmt: skip
    assert sum(t.sleeps) <= 20 and len(t.sleeps) == 7  # 1+2+4+4+4+4 = 19, then 4 > 1 left
    message = info.value.message
    assert message.startswith("key broker 127.0.0.1:")
    assert "no key 'k' within [key_broker] wait_s = 20 s (8 attempts); last: unavailable" in (
        message
    )
    assert "[key_broker] wait_s" in info.value.remedy and "\n" not in message


def test_tls_failure_is_retried_with_a_hint_naming_the_config_key_and_a_rotated_pin_is_used(
    start_broker: Callable[..., Running], sim_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_broker()
    data_key = generate_key()
    with running.admin() as admin:
        admin.add_key("k", data_key, policy_toml=SIM_POLICY, roots=["unsafe-simulated"])
    pins = iter([TlsIdentity.generate().cert_pem, running.ca_pem])  # stale, then rotated
    t = FakeTime(limit=5)
    caplog.set_level(logging.INFO)
    key = _fetch(running.target, sim_root, broker_ca_pem=TlsIdentity.generate().cert_pem,
                 broker_ca_source=lambda: next(pins), broker_server_name="localhost",
                 sleep=t.sleep, clock=t.clock)  # fmt: skip
    assert key == data_key and len(t.sleeps) == 2
    assert caplog.text.count("TLS verification failed") == 2
    assert "does not verify against [key_broker] ca_file" in caplog.text
    assert "broker_ca_pem" not in caplog.text


def test_a_name_not_in_the_certificate_is_a_tls_failure_too(
    start_broker: Callable[..., Running], sim_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_broker(tls_hostnames=("broker.internal",))
    t = FakeTime(limit=2)
    with pytest.raises(Stop):
        _fetch(running.target, sim_root, broker_ca_pem=running.ca_pem, sleep=t.sleep,
               clock=t.clock)  # fmt: skip
    assert caplog.text.count("TLS verification failed") == 2
    assert "[key_broker] server_name" in caplog.text


def test_a_refusal_ends_the_wait_at_once(
    start_broker: Callable[..., Running], sim_root: Path
) -> None:
    running = start_broker()
    with running.admin() as admin:
        admin.add_key("k", generate_key(), policy_toml=SIM_POLICY, roots=["unsafe-simulated"])
    t = FakeTime()
    with pytest.raises(KeyReleaseError, match="refused to release key 'k'"):
        _fetch(running.target, sim_root, broker_ca_pem=running.ca_pem,
               broker_server_name="localhost", sleep=t.sleep, clock=t.clock,
               platform=SimulatedPlatform(sim_root, debug=True))  # fmt: skip
    assert t.sleeps == []


def test_stopping_the_server_ends_a_wait_in_progress(sim_root: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    release = KeyRelease(SimulatedPlatform(sim_root), tls_spki=b"s", manifest=b"m",
                         hpke_private_key=X25519PrivateKey.generate())  # fmt: skip
    keys = KeyProvider(
        broker=KeyBrokerSettings(target=f"127.0.0.1:{_dead_port()}"), release=release
    )
    box: dict[str, BaseException] = {}

    def wait() -> None:
        try:
            keys.get("k")
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive()  # still waiting: no deadline
    keys.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(box["error"], KeyReleaseError)
    assert "stopped while waiting for the key broker" in box["error"].message


def test_an_unreadable_ca_file_is_a_config_error_at_start(tmp_path: Path) -> None:
    keys = KeyProvider(
        broker=KeyBrokerSettings(target="127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    )
    with pytest.raises(ConfigError, match=r"\[key_broker\] ca_file .*missing.pem: cannot read"):
        keys.check()
