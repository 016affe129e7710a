"""The broker and Intel TDX: roots apply to TDX, and TDX collateral is always evaluated
(from the evidence, or from the broker's collateral cache directory)."""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tdx_quote import TdxQuote
from sealserve.broker.core import REFUSED_MESSAGE, KeyBroker
from sealserve.broker.nonces import NonceBook
from sealserve.broker.store import KeyStore
from sealserve.errors import KeyReleaseError
from tests.attestation._tdx_util import DCAP_COLLATERAL, DCAP_QUOTE, NOW_DCAP

QUOTE = DCAP_QUOTE.read_bytes()
MRTD = TdxQuote.from_bytes(QUOTE).td_report.mrtd.hex()
POLICY = f'platforms = ["tdx"]\n[tdx]\nmrtd = ["{MRTD}"]\ntcb_status = ["UpToDate"]\n'


def _broker(tmp_path: Path, *, cache: Path | None = None) -> KeyBroker:
    store = KeyStore.open(tmp_path / "keys.sealed", master_key=secrets.token_bytes(32))
    broker = KeyBroker(
        store,
        nonces=NonceBook(ttl=60),
        roots={"amd": TrustedRoots.amd(), "intel": TrustedRoots.intel_sgx()},
        clock=NOW_DCAP.timestamp,
        tdx_collateral_dir=cache,
    )
    broker.add_key("intel-key", None, policy_toml=POLICY, roots=("intel",))
    broker.add_key("amd-key", None, policy_toml=POLICY, roots=("amd",))
    return broker


def _evidence(broker: KeyBroker, *, collateral: bytes = b"") -> bytes:
    # A genuine quote cannot bind the broker's nonce: every path ends in a refusal, and
    # the log says which check refused it.
    return Evidence(
        platform=Platform.TDX,
        report=QUOTE,
        certs=collateral,
        manifest=b"{}",
        tls_spki=b"spki",
        hpke_public_key=bytes(32),
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


def test_amd_roots_do_not_release_to_a_td(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = _broker(tmp_path)
    ev = _evidence(broker, collateral=DCAP_COLLATERAL.read_bytes())
    assert _refused_check(broker, "amd-key", ev, caplog) == "roots"


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
