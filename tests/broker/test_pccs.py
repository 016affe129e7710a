"""TDX collateral fetched from a PCCS (a loopback stand-in serving the dcap-qvl vector's
collateral the way a PCCS does): fetched, verified, cached; a slow PCCS hits the
deadline; the broker uses it for quotes that brought no collateral."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote as urlquote
from urllib.parse import urlsplit

import pytest

from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tdx import quote_fmspc, verify_tdx_at_time
from sealserve.attestation.tdx_quote import TdxQuote
from sealserve.broker.core import REFUSED_MESSAGE, KeyBroker
from sealserve.broker.nonces import NonceBook
from sealserve.broker.pccs import PccsClient
from sealserve.broker.store import KeyStore
from sealserve.errors import KeyReleaseError, UnavailableError
from tests.attestation._tdx_util import DCAP_COLLATERAL, DCAP_QUOTE, NOW_DCAP

DOC = json.loads(DCAP_COLLATERAL.read_text())
QUOTE = DCAP_QUOTE.read_bytes()


class _Pccs(BaseHTTPRequestHandler):
    delay = 0.0
    hits: list[str] = []

    def do_GET(self) -> None:
        time.sleep(self.delay)
        path = urlsplit(self.path).path
        type(self).hits.append(path)
        if path.endswith("/sgx/certification/v4/pckcrl"):
            body = bytes.fromhex(DOC["pck_crl"])
            headers = {"SGX-PCK-CRL-Issuer-Chain": DOC["pck_crl_issuer_chain"]}
        elif path.endswith("/tdx/certification/v4/tcb"):
            body = f'{{"tcbInfo":{DOC["tcb_info"]},"signature":"{DOC["tcb_info_signature"]}"}}'.encode()
            headers = {"TCB-Info-Issuer-Chain": DOC["tcb_info_issuer_chain"]}
        elif path.endswith("/tdx/certification/v4/qe/identity"):
            body = (
                f'{{"enclaveIdentity":{DOC["qe_identity"]},'
                f'"signature":"{DOC["qe_identity_signature"]}"}}'
            ).encode()
            headers = {"SGX-Enclave-Identity-Issuer-Chain": DOC["qe_identity_issuer_chain"]}
        elif path.endswith("/sgx/certification/v4/rootcacrl"):
            body, headers = DOC["root_ca_crl"].encode(), {}
        else:
            self.send_error(404)
            return
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, urlquote(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up on a slow answer (the deadline test)


@pytest.fixture
def pccs() -> Iterator[str]:
    _Pccs.delay = 0.0
    _Pccs.hits = []
    server = _Server(("127.0.0.1", 0), _Pccs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetched_collateral_verifies_up_to_date_and_is_cached(pccs: str) -> None:
    client = PccsClient(pccs, timeout=10)
    fmspc = quote_fmspc(QUOTE)
    collateral = client.collateral(fmspc, QUOTE)
    claims = verify_tdx_at_time(QUOTE, now=NOW_DCAP, collateral=collateral)
    assert claims.fields["tcb_status"] == "UpToDate"
    assert claims.fields["collateral_verified"] is True
    fetched = len(_Pccs.hits)
    assert fetched >= 3
    assert client.collateral(fmspc, QUOTE) is collateral  # within the ttl: no new fetch
    assert len(_Pccs.hits) == fetched


def test_slow_pccs_hits_the_deadline(pccs: str) -> None:
    _Pccs.delay = 2.0
    client = PccsClient(pccs, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(UnavailableError, match="did not answer within 0.3 s"):
        client.collateral(quote_fmspc(QUOTE), QUOTE)
    assert time.monotonic() - start < 1.9


def test_pccs_that_does_not_answer_is_unavailable() -> None:
    client = PccsClient("http://127.0.0.1:9", timeout=5)  # discard port: refused
    with pytest.raises(UnavailableError, match="PCCS"):
        client.collateral(quote_fmspc(QUOTE), QUOTE)


def test_broker_uses_the_pccs_for_a_td_without_collateral(
    pccs: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mrtd = TdxQuote.from_bytes(QUOTE).td_report.mrtd.hex()
    store = KeyStore.open(tmp_path / "keys.sealed", master_key=secrets.token_bytes(32))
    broker = KeyBroker(
        store,
        nonces=NonceBook(ttl=60),
        roots={"intel": TrustedRoots.intel_sgx()},
        clock=NOW_DCAP.timestamp,
        pccs=PccsClient(pccs, timeout=10),
    )
    policy = f'platforms = ["tdx"]\n[tdx]\nmrtd = ["{mrtd}"]\ntcb_status = ["UpToDate"]\n'
    broker.add_key("k", None, policy_toml=policy, roots=("intel",))
    evidence = Evidence(
        platform=Platform.TDX,
        report=QUOTE,
        certs=b"",
        manifest=b"{}",
        tls_spki=b"spki",
        hpke_public_key=bytes(32),
        nonce=broker.challenge(),
    ).to_bytes()
    with caplog.at_level(logging.WARNING, logger="sealserve.broker"):
        with pytest.raises(KeyReleaseError, match=REFUSED_MESSAGE):
            broker.release("k", evidence)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "key_release_refused"]
    # Collateral fetched and verified; the genuine quote cannot bind the broker's nonce.
    assert record.check == "report_data_binding"
    assert _Pccs.hits


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://pccs.example:8081", True),
        ("http://127.0.0.1:8081", True),
        ("http://pccs.example:8081", False),
        ("ftp://127.0.0.1/", False),
    ],
)
def test_pccs_url_must_be_https_or_loopback(
    tmp_path: Path, admin_issuer: tuple[object, Path], url: str, ok: bool
) -> None:
    from sealserve.errors import ConfigError
    from tests.broker.conftest import broker_settings

    if ok:
        assert broker_settings(tmp_path, admin_issuer[1], None, tdx_pccs_url=url).tdx_pccs_url
    else:
        with pytest.raises(ConfigError, match="use https"):
            broker_settings(tmp_path, admin_issuer[1], None, tdx_pccs_url=url)
