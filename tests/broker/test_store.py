"""Key store at rest, master keys, nonces and settings: the broker's pieces alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sealserve.broker.nonces import NonceBook, NonceExpired, NonceUnknown
from sealserve.broker.settings import BrokerSettings
from sealserve.broker.store import ROOT_AMD, KeyStore, load_master_key
from sealserve.enclave.model_file import generate_key
from sealserve.errors import ConfigError, CryptoError, OverloadedError, SealedFormatError

MASTER = bytes(range(32))


def test_store_file_holds_no_plaintext_key_and_needs_the_master_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.sealed"
    key = generate_key()
    store = KeyStore.open(path, master_key=MASTER)
    store.add("model-a", key, policy_toml="unsafe_allow_simulated = true\n", roots=(ROOT_AMD,))
    blob = path.read_bytes()
    assert blob.startswith(b"SEALKBRK\x01")
    assert key not in blob and key.hex().encode() not in blob
    assert b"model-a" not in blob  # the whole document is encrypted, ids included
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert KeyStore.open(path, master_key=MASTER).get("model-a").key == key  # type: ignore[union-attr]
    with pytest.raises(CryptoError, match="does not open with this master key"):
        KeyStore.open(path, master_key=bytes(32))
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    path.write_bytes(bytes(tampered))
    with pytest.raises(CryptoError, match="does not open with this master key"):
        KeyStore.open(path, master_key=MASTER)
    path.write_bytes(b"something else entirely, long enough to parse")
    with pytest.raises(SealedFormatError, match="is not a sealserve broker key store"):
        KeyStore.open(path, master_key=MASTER)


def test_revoke_erases_the_key_material(tmp_path: Path) -> None:
    path = tmp_path / "keys.sealed"
    store = KeyStore.open(path, master_key=MASTER)
    store.add("k", generate_key(), roots=(ROOT_AMD,))
    store.revoke("k")
    record = KeyStore.open(path, master_key=MASTER).get("k")
    assert record is not None and record.revoked and record.key == b""
    assert "key=" not in repr(record) and "revoked=True" in repr(record)


def test_master_key_formats() -> None:
    assert load_master_key(("ab" * 32 + "\n").encode()) == bytes([0xAB]) * 32
    assert load_master_key(MASTER) == MASTER
    for bad in (b"", b"ab" * 31, b"zz" * 32, bytes(33)):
        with pytest.raises(ConfigError, match="expected 64 hex digits"):
            load_master_key(bad)


def test_nonces_are_single_use_and_expire() -> None:
    now = [0.0]
    book = NonceBook(ttl=60, clock=lambda: now[0])
    nonce = book.issue()
    assert len(nonce) == 32 and book.issue() != nonce
    book.redeem(nonce)
    with pytest.raises(NonceUnknown, match="already used"):
        book.redeem(nonce)
    with pytest.raises(NonceUnknown, match="not issued by this broker"):
        book.redeem(bytes(32))
    late = book.issue()
    now[0] = 60.5
    with pytest.raises(NonceExpired, match=r"nonce expired 0.5 s ago \(ttl 60 s\)"):
        book.redeem(late)
    with pytest.raises(NonceUnknown):
        book.redeem(late)  # an expired nonce is used up too


def test_outstanding_nonces_are_bounded() -> None:
    now = [0.0]
    book = NonceBook(ttl=10, max_outstanding=2, clock=lambda: now[0])
    book.issue()
    book.issue()
    with pytest.raises(OverloadedError, match="too many outstanding challenges"):
        book.issue()
    now[0] = 11  # both expired: swept on the next issue
    book.issue()
    assert len(book) == 1


def test_settings_need_one_master_key_and_admin(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    admin = {"issuer": "https://a", "jwks_file": jwks}
    with pytest.raises(ConfigError, match="exactly one of master_key_file and SEALSERVE_BROKER_"):
        BrokerSettings.load(None, store_file=tmp_path / "s", admin=admin)
    with pytest.raises(ConfigError, match="admin: Field required"):
        BrokerSettings.load(None, store_file=tmp_path / "s", master_key="00" * 32)
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file must be set together"):
        BrokerSettings.load(
            None,
            store_file=tmp_path / "s",
            master_key="00" * 32,
            admin=admin,
            tls_cert_file=tmp_path / "c.pem",
        )


def test_settings_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        'store_file = "keys.sealed"\nmaster_key_file = "master.key"\n'
        '[admin]\nissuer = "https://admin"\njwks_file = "jwks.json"\n'
    )
    (tmp_path / "master.key").write_text("cd" * 32 + "\n")
    monkeypatch.setenv("SEALSERVE_BROKER_PORT", "9555")
    settings = BrokerSettings.load(config)
    assert settings.host == "127.0.0.1" and settings.port == 9555
    assert settings.store_file == tmp_path / "keys.sealed"
    assert settings.admin.jwks_file == tmp_path / "jwks.json"
    assert settings.read_master_key() == bytes([0xCD]) * 32
    assert "cd" * 32 not in repr(settings)
    monkeypatch.setenv("SEALSERVE_BROKER_MASTER_KEY", "ef" * 32)
    with pytest.raises(ConfigError, match="exactly one of master_key_file"):
        BrokerSettings.load(config)
