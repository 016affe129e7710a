"""The broker and Intel TDX: roots apply to TDX, and TDX collateral is always evaluated
(from the evidence, or from the broker's collateral cache directory)."""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import sealserve.attestation.evidence as evidence_module
from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.broker.core import REFUSED_MESSAGE, KeyBroker
from sealserve.broker.nonces import NonceBook
from sealserve.broker.store import KeyStore
from sealserve.enclave.key_release import hpke_public_bytes
from sealserve.errors import ConfigError, KeyReleaseError
from tests.attestation._tdx_util import DCAP_COLLATERAL, DCAP_QUOTE, NOW_DCAP, launch_policy

QUOTE = DCAP_QUOTE.read_bytes()
POLICY = launch_policy(QUOTE)


def _broker(
    tmp_path: Path, *, cache: Path | None = None, roots: tuple[str, ...] = ("amd", "intel")
) -> KeyBroker:
    store = KeyStore.open(tmp_path / "keys.sealed", master_key=secrets.token_bytes(32))
    known = {"amd": TrustedRoots.amd(), "intel": TrustedRoots.intel_sgx()}
    broker = KeyBroker(
        store,
        nonces=NonceBook(ttl=60),
        roots={name: known[name] for name in roots},
        clock=NOW_DCAP.timestamp,
        tdx_collateral_dir=cache,
    )
    broker.add_key("intel-key", None, policy_toml=POLICY, roots=("intel",))
    return broker


def _evidence(broker: KeyBroker, *, collateral: bytes = b"", hpke: bytes = bytes(32)) -> bytes:
    # A genuine quote cannot bind the broker's nonce: every path ends in a refusal, and
    # the log says which check refused it.
    return Evidence(
        platform=Platform.TDX,
        report=QUOTE,
        certs=collateral,
        manifest=b"{}",
        tls_spki=b"spki",
        hpke_public_key=hpke,
        nonce=broker.challenge(),
    ).to_bytes()


def _refused_check(
    broker: KeyBroker, key_id: str, evidence: bytes, caplog: pytest.LogCaptureFixture
) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sealserve.broker"):
        with pytest.raises(KeyReleaseError) as info:
            broker.release(key_id, evidence)
    assert info.value.message == REFUSED_MESSAGE
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "key_release_refused"]
    return str(record.check)


def test_a_tdx_policy_needs_the_intel_root(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    with pytest.raises(ConfigError, match="tdx evidence needs the 'intel' root"):
        broker.add_key("amd-key", None, policy_toml=POLICY, roots=("amd",))


def test_amd_roots_do_not_release_to_a_td(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = _broker(tmp_path)
    broker.add_key(
        "amd-key", None, policy_toml=POLICY, roots=("amd",), unsafe_allow_incomplete=True
    )
    # The one step a genuine quote of another TD cannot pass is the nonce binding; with
    # it switched off, the evidence is verified (chain, QE, collateral) and the key's
    # roots decide: the TD chains to the 'intel' root, which amd-key does not trust.
    monkeypatch.setattr(evidence_module, "verify_report_data_binding", lambda *a, **k: None)
    hpke = hpke_public_bytes(X25519PrivateKey.generate())
    collateral = DCAP_COLLATERAL.read_bytes()
    ev = _evidence(broker, collateral=collateral, hpke=hpke)
    assert _refused_check(broker, "amd-key", ev, caplog) == "trusted_root"
    # The same evidence releases intel-key's key (roots and policy pass).
    assert broker.release("intel-key", _evidence(broker, collateral=collateral, hpke=hpke))


def test_a_broker_without_the_intel_root_refuses_every_td(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _broker(tmp_path, roots=("amd",))
    ev = _evidence(broker, collateral=DCAP_COLLATERAL.read_bytes())
    assert _refused_check(broker, "intel-key", ev, caplog) == "roots"


def test_td_without_collateral_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = _broker(tmp_path)
    assert _refused_check(broker, "intel-key", _evidence(broker), caplog) == "collateral"
    # Whatever the policy says: without a tcb_status rule it is still refused.
    broker.set_policy("intel-key", policy_toml=POLICY.replace('tcb_status = ["UpToDate"]\n', ""))
    assert _refused_check(broker, "intel-key", _evidence(broker), caplog) == "collateral"


def test_guest_supplied_collateral_is_evaluated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _broker(tmp_path)
    ev = _evidence(broker, collateral=DCAP_COLLATERAL.read_bytes())
    # Chain, QE, collateral signatures and TCB all pass; the nonce binding cannot.
    assert _refused_check(broker, "intel-key", ev, caplog) == "report_data_binding"
    edited = DCAP_COLLATERAL.read_bytes().replace(b'\\"UpToDate\\"', b'\\"OutOfDate\\"', 1)
    assert edited != DCAP_COLLATERAL.read_bytes()
    ev = _evidence(broker, collateral=edited)
    assert _refused_check(broker, "intel-key", ev, caplog) == "collateral_signature"


def test_collateral_from_the_cache_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "tdx-collateral"
    cache.mkdir()
    broker = _broker(tmp_path, cache=cache)
    # Nothing cached for this FMSPC yet.
    assert _refused_check(broker, "intel-key", _evidence(broker), caplog) == "collateral"
    shutil.copy(DCAP_COLLATERAL, cache / "b0c06f000000.json")
    # Chain, QE, collateral signatures and TCB all pass; the nonce binding cannot.
    assert _refused_check(broker, "intel-key", _evidence(broker), caplog) == ("report_data_binding")
    # A damaged cache file is a refusal too, never a weaker check.
    (cache / "b0c06f000000.json").write_text("{}")
    assert _refused_check(broker, "intel-key", _evidence(broker), caplog) == "collateral_format"
