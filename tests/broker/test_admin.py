"""The admin API: the credential is required, and each operation does what it says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sealserve.broker.admin_client import BrokerAdmin
from sealserve.broker.store import KeyStore
from sealserve.enclave.model_file import generate_key
from sealserve.errors import AuthenticationError, InputError, NotFoundError, PermissionDeniedError
from tests.broker.conftest import MASTER_HEX, SIM_POLICY, Running, admin_token

pytestmark = pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning")


def test_admin_calls_without_the_credential_are_refused(
    start_broker: Callable[..., Running],
) -> None:
    running = start_broker()
    no_token = BrokerAdmin(running.target, token="", ca_pem=running.ca_pem)
    forged = BrokerAdmin(running.target, token="eyJhbGciOi.J9.x", ca_pem=running.ca_pem)
    infer_only = running.admin(admin_token(running.issuer, scopes=("infer",)))
    calls: list[Callable[[BrokerAdmin], object]] = [
        lambda a: a.add_key("k", generate_key(), policy_toml=SIM_POLICY),
        lambda a: a.set_policy("k", SIM_POLICY),
        lambda a: a.list_keys(),
        lambda a: a.revoke_key("k"),
    ]
    for call in calls:
        with pytest.raises(AuthenticationError, match="empty bearer token"):
            call(no_token)
        with pytest.raises(AuthenticationError, match="key broker: invalid or expired token"):
            call(forged)
        with pytest.raises(PermissionDeniedError, match="lacks the 'admin' scope"):
            call(infer_only)
    for admin in (no_token, forged, infer_only):
        admin.close()
    assert running.broker.list_keys() == []


def test_add_list_set_policy_revoke(start_broker: Callable[..., Running]) -> None:
    running = start_broker()
    with running.admin() as admin:
        assert admin.add_key("a", generate_key()) is None
        generated = admin.add_key("b", None, policy_toml=SIM_POLICY, roots=["unsafe-simulated"])
        assert generated is not None and len(generated) == 32
        assert running.broker.store.get("b").key == generated  # type: ignore[union-attr]
        admin.set_policy("a", SIM_POLICY, roots=["amd", "unsafe-simulated"])
        admin.revoke_key("b")
        keys = {k.key_id: k for k in admin.list_keys()}
        assert keys["a"].policy_toml == SIM_POLICY
        assert keys["a"].roots == ("amd", "unsafe-simulated")
        assert keys["b"].revoked and not keys["a"].revoked
        with pytest.raises(InputError, match="key id 'b' already exists"):
            admin.add_key("b", generate_key())
        with pytest.raises(NotFoundError, match="no live key with id 'b'"):
            admin.set_policy("b", SIM_POLICY)
        with pytest.raises(NotFoundError, match="no live key with id 'zz'"):
            admin.revoke_key("zz")
        with pytest.raises(InputError, match="a data key must be 32 bytes, got 5"):
            admin.add_key("c", b"short")
        with pytest.raises(InputError, match="policy: unknown key"):
            admin.add_key("c", generate_key(), policy_toml="no_such_rule = 1\n")
        with pytest.raises(InputError, match="unknown root 'nvidia'"):
            admin.add_key("c", generate_key(), roots=["nvidia"])
    assert running.broker.store.get("b").key == b""  # type: ignore[union-attr]


def test_simulated_root_needs_the_broker_to_be_configured_for_it(
    start_broker: Callable[..., Running],
) -> None:
    running = start_broker(unsafe_simulated_root_dir=None)
    with running.admin() as admin, pytest.raises(InputError, match="unsafe_simulated_root_dir"):
        admin.add_key("k", generate_key(), policy_toml=SIM_POLICY, roots=["unsafe-simulated"])


def test_keys_survive_a_restart(start_broker: Callable[..., Running], tmp_path: Path) -> None:
    running = start_broker()
    key = generate_key()
    with running.admin() as admin:
        admin.add_key("persist", key, policy_toml=SIM_POLICY)
    reopened = KeyStore.open(tmp_path / "keys.sealed", master_key=bytes.fromhex(MASTER_HEX))
    record = reopened.get("persist")
    assert record is not None and record.key == key and record.policy_toml == SIM_POLICY


def test_offering_the_simulated_root_warns(tmp_path: Path, sim_root: Path) -> None:
    from sealserve.broker.app import UnsafeSimulatedRootWarning, build_broker
    from tests.broker.conftest import broker_settings

    settings = broker_settings(tmp_path, tmp_path / "jwks.json", sim_root)
    with pytest.warns(
        UnsafeSimulatedRootWarning, match="UNSAFE: the key broker trusts the SIMULATED"
    ):
        broker = build_broker(settings)
    assert broker.simulated_allowed
    assert not build_broker(broker_settings(tmp_path, tmp_path / "j", None)).simulated_allowed
