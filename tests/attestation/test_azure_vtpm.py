"""azure-vtpm: TPM quotes (genuine vector), the HCL report + quote evidence, the
platform that produces it (swtpm + a stand-in paravisor), and its policy section."""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sealserve.attestation.azure_vtpm import VtpmBundle, verify_azure_vtpm_at_time
from sealserve.attestation.binding import verify_report_data_binding
from sealserve.attestation.claims import Claims, Platform
from sealserve.attestation.evidence import verify_evidence_at_time
from sealserve.attestation.policy import DEFAULT_POLICY, policy_from_toml
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.attestation.tpm_quote import TpmQuote, verify_quote
from sealserve.broker.completeness import policy_gaps
from sealserve.enclave.azure_vtpm import AzureVtpmPlatform
from sealserve.enclave.platform import attest
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import AttestationError, PolicyError, UnavailableError
from tests._vtpm import FakeParavisor, simulated_chain_pem, swtpm
from tests.conftest import VECTORS

TPM = VECTORS / "tpm" / "az-cvm-vtpm"
AZ = VECTORS / "sev-snp" / "trustee" / "az-snp-vtpm"
SNP_AT = datetime(2025, 6, 1, tzinfo=UTC)


def _genuine_quote() -> tuple[bytes, bytes, dict[int, bytes]]:
    """az-cvm-vtpm's test/quote.bin (bincode: signature, message, PCR values)."""
    data = (TPM / "quote.bin").read_bytes()
    parts, pos = [], 0
    for _ in range(2):
        (n,) = struct.unpack_from("<Q", data, pos)
        parts.append(data[pos + 8 : pos + 8 + n])
        pos += 8 + n
    (count,) = struct.unpack_from("<Q", data, pos)
    pcrs = {i: data[pos + 8 + 32 * i : pos + 40 + 32 * i] for i in range(count)}
    assert pos + 8 + 32 * count == len(data)
    return parts[1], parts[0], pcrs


def _ak():  # type: ignore[no-untyped-def]
    return load_pem_public_key((TPM / "akpub.pem").read_bytes())


def test_genuine_quote_verifies() -> None:
    message, signature, pcrs = _genuine_quote()
    quote = verify_quote(message, signature, key=_ak(), pcrs=pcrs)
    assert quote.extra_data == b"challenge"  # the nonce upstream quoted with
    assert quote.sha256_indices() == tuple(range(24))
    # tpm2_quote's default output (a marshalled TPMT_SIGNATURE) is accepted too
    marshalled = struct.pack(">HHH", 0x0014, 0x000B, 256) + signature
    assert verify_quote(message, marshalled, key=_ak(), pcrs=pcrs) == quote


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("tamper", "check"),
    [
        (lambda m, s, p: (_flip(m, 40), s, p), "tpm_quote_signature"),  # the clock
        (lambda m, s, p: (m, s[::-1], p), "tpm_quote_signature"),
        (lambda m, s, p: (m, s, {**p, 4: bytes(32)}), "tpm_pcr_digest"),
        (lambda m, s, p: (m, s, {i: v for i, v in p.items() if i != 23}), "tpm_pcr_digest"),
        (lambda m, s, p: (m + b"\0", s, p), "tpm_quote_format"),
        (lambda m, s, p: (b"\0\0\0\0" + m[4:], s, p), "tpm_quote_format"),
        (lambda m, s, p: (m, s[:-1], p), "tpm_quote_format"),
    ],
    ids=["message", "signature", "pcr-value", "pcr-missing", "trailing", "magic", "sig-len"],
)
def test_tampered_genuine_quote_is_refused(tamper, check: str) -> None:  # type: ignore[no-untyped-def]
    message, signature, pcrs = tamper(*_genuine_quote())
    with pytest.raises(AttestationError) as err:
        verify_quote(message, signature, key=_ak(), pcrs=pcrs)
    assert err.value.check == check


def test_quote_of_another_bank_is_refused() -> None:
    message, _, _ = _genuine_quote()
    quote = TpmQuote.from_bytes(message)
    other = dataclasses.replace(quote, selection=((0x000C, (0, 1)),))  # SHA-384
    with pytest.raises(AttestationError, match="only one SHA-256 bank"):
        other.sha256_indices()


def test_genuine_hcl_report_with_another_vms_quote_is_refused() -> None:
    """A genuine Azure HCL report binds its own vTPM key; a genuine quote by another
    VM's vTPM does not pass as this VM's PCRs."""
    message, signature, pcrs = _genuine_quote()
    bundle = VtpmBundle(message, signature, pcrs, (AZ / "vcek.pem").read_bytes()).to_bytes()
    with pytest.raises(AttestationError) as err:
        verify_azure_vtpm_at_time(
            (AZ / "hcl-report.bin").read_bytes(), bundle, roots=TrustedRoots.amd(), now=SNP_AT
        )
    assert err.value.check == "tpm_quote_signature"


def test_bundle_bad_input_is_named() -> None:
    report = (AZ / "hcl-report.bin").read_bytes()
    for bad in (b"not json", b'{"format":"x"}', b'{"format":"sealserve-azure-vtpm","version":9}'):
        with pytest.raises(AttestationError) as err:
            verify_azure_vtpm_at_time(report, bad, roots=TrustedRoots.amd(), now=SNP_AT)
        assert err.value.check == "vtpm_format"


# --- the platform, on a real TPM implementation (swtpm) ---------------------------------


@pytest.fixture(scope="module")
def vtpm(sim_root: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with swtpm(tmp_path_factory.mktemp("vtpm")) as (tpm, ak):
        yield FakeParavisor(tpm, SimulatedPlatform(sim_root, measurement=b"\x42" * 48), ak)


def _platform(vtpm: FakeParavisor, sim_root: Path, **kw: float) -> AzureVtpmPlatform:
    return AzureVtpmPlatform(vtpm, vcek_chain=simulated_chain_pem(sim_root), **kw)


def _verify(report: bytes, certs: bytes, sim_root: Path) -> Claims:
    return verify_azure_vtpm_at_time(
        report, certs, roots=TrustedRoots.from_dir(sim_root), now=datetime.now(UTC)
    )


def test_platform_report_verifies(vtpm: FakeParavisor, sim_root: Path) -> None:
    report_data = bytes(range(64))
    produced = _platform(vtpm, sim_root).report(report_data)
    assert produced.kind is Platform.AZURE_VTPM
    claims = _verify(produced.report, produced.certs, sim_root)
    assert claims.report_data == report_data
    assert claims.measurements["measurement"] == b"\x42" * 48
    assert sorted(claims.measurements) == sorted(["measurement", *(f"pcr{i}" for i in range(24))])
    names = [c.name for c in claims.checks]
    for check in ("hcl_runtime_binding", "vtpm_user_data", "tpm_quote_signature",
                  "tpm_pcr_digest", "tpm_quote_nonce"):  # fmt: skip
        assert check in names
    # a simulated chain never makes genuine azure-vtpm claims
    assert claims.platform is Platform.SIMULATED_SNP


def test_quote_from_another_request_is_refused(vtpm: FakeParavisor, sim_root: Path) -> None:
    platform = _platform(vtpm, sim_root)
    first = platform.report(b"\x01" * 64)
    second = platform.report(b"\x02" * 64)
    # the fresh HCL report with the first request's quote and PCRs
    with pytest.raises(AttestationError) as err:
        _verify(second.report, first.certs, sim_root)
    assert err.value.check == "tpm_quote_nonce"
    # PCR values edited after the quote
    bundle = VtpmBundle.from_bytes(second.certs)
    edited = dataclasses.replace(bundle, pcrs={**bundle.pcrs, 11: b"\x11" * 32}).to_bytes()
    with pytest.raises(AttestationError) as err:
        _verify(second.report, edited, sim_root)
    assert err.value.check == "tpm_pcr_digest"


def test_a_stale_hcl_report_is_never_used(vtpm: FakeParavisor, sim_root: Path) -> None:
    platform = _platform(vtpm, sim_root, refresh_timeout_s=0.3, poll_s=0.05)
    platform.report(b"\x03" * 64)
    vtpm.stale = True
    try:
        with pytest.raises(UnavailableError, match="did not carry our REPORT_DATA"):
            platform.report(b"\x04" * 64)
    finally:
        vtpm.stale = False


def test_evidence_binds_and_a_simulated_chain_is_not_azure(
    vtpm: FakeParavisor, sim_root: Path
) -> None:
    nonce = b"n" * 32
    evidence = attest(
        _platform(vtpm, sim_root), nonce=nonce, tls_spki=b"spki", manifest=b"{}",
        hpke_public_key=b"h" * 32,
    )  # fmt: skip
    assert evidence.platform is Platform.AZURE_VTPM
    roots = TrustedRoots.from_dir(sim_root)
    with pytest.raises(AttestationError) as err:
        verify_evidence_at_time(
            evidence, policy=DEFAULT_POLICY, roots=roots, expected_nonce=nonce,
            now=datetime.now(UTC),
        )  # fmt: skip
    assert err.value.check == "platform"
    # what the chain does verify binds this evidence's nonce, keys and manifest
    claims = _verify(evidence.report, evidence.certs, sim_root)
    bound = {"nonce": nonce, "tls_spki": b"spki", "manifest": b"{}",
             "hpke_public_key": b"h" * 32, "runtime_keys": evidence.runtime_keys}  # fmt: skip
    verify_report_data_binding(claims.report_data, **bound)
    with pytest.raises(AttestationError):
        verify_report_data_binding(claims.report_data, **{**bound, "manifest": b'{"x":1}'})


def test_sealing_keys_are_refused(vtpm: FakeParavisor, sim_root: Path) -> None:
    with pytest.raises(UnavailableError, match="not supported"):
        _platform(vtpm, sim_root).sealing_key(b"x")


# --- policy -------------------------------------------------------------------------


def _claims(**pcrs: bytes) -> Claims:
    return Claims(
        platform=Platform.AZURE_VTPM,
        report_data=bytes(64),
        debug=False,
        measurements={"measurement": b"\x42" * 48, **pcrs},
        fields={"policy_migrate_ma": False, "reported_tcb": {"bl": 9, "tee": 9, "snp": 30,
                "ucode": 250, "fmc": None}},
    )  # fmt: skip


AZ_POLICY = f"""
platforms = ["azure-vtpm"]
[azure-vtpm]
measurement = ["{"42" * 48}"]
pcr4 = ["{"04" * 32}"]
pcr7 = ["{"07" * 32}"]
pcr8 = ["{"00" * 32}"]
pcr9 = ["{"00" * 32}"]
pcr11 = ["{"0b" * 32}"]
pcr12 = ["{"00" * 32}"]
"""


GOOD = {"pcr4": b"\x04" * 32, "pcr7": b"\x07" * 32, "pcr8": bytes(32), "pcr9": bytes(32),
        "pcr11": b"\x0b" * 32, "pcr12": bytes(32)}  # fmt: skip


def test_azure_policy_pins_paravisor_and_pcrs() -> None:
    policy = policy_from_toml(AZ_POLICY)
    good = GOOD
    policy.verify(_claims(**good))
    with pytest.raises(PolicyError, match="pcr11"):
        policy.verify(_claims(**{**good, "pcr11": b"\x0c" * 32}))
    assert policy_gaps(AZ_POLICY, ["amd"]) == []
    with pytest.raises(Exception, match="pcr4"):
        policy_from_toml(AZ_POLICY.replace("04" * 32, "04" * 48))  # a PCR is 32 bytes


def test_azure_must_be_named_and_pinned() -> None:
    claims = _claims()
    with pytest.raises(PolicyError, match="azure-vtpm is not allowed"):
        DEFAULT_POLICY.verify(claims)
    with pytest.raises(PolicyError, match="azure-vtpm is not allowed"):
        policy_from_toml("").verify(claims)
    # `unsafe_allow_simulated = false` is no way around the platform default
    pinned = 'unsafe_allow_simulated = false\nmeasurements = { measurement = ["' + "42" * 48 + '"] }'
    with pytest.raises(PolicyError, match="azure-vtpm is not allowed"):
        policy_from_toml(pinned).verify(claims)
    gaps = policy_gaps('platforms = ["azure-vtpm"]\n[azure-vtpm]\nmeasurement = ["' + "42" * 48
                       + '"]\n', ["amd"])  # fmt: skip
    assert gaps and "pcr4, pcr7, pcr8, pcr9, pcr11, pcr12" in gaps[0]
    # A GRUB boot of another command line: PCR 8 moves, the UKI's PCRs do not.
    with pytest.raises(PolicyError, match="pcr8"):
        policy_from_toml(AZ_POLICY).verify(_claims(**{**GOOD, "pcr8": b"\x08" * 32}))
    assert any("'amd' root" in g for g in policy_gaps(AZ_POLICY, ["intel"]))


# --- the auditor's CLI -----------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    import json

    from sealserve.cli.main import main

    rc = main(["verify", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_cli_verifies_an_hcl_report_with_its_vtpm_bundle(
    vtpm: FakeParavisor, sim_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_data = b"\x07" * 64
    produced = _platform(vtpm, sim_root).report(report_data)
    (tmp_path / "hcl.bin").write_bytes(produced.report)
    (tmp_path / "bundle.json").write_bytes(produced.certs)
    policy = tmp_path / "dev.toml"
    policy.write_text("version = 1\nunsafe_allow_simulated = true\n")
    files = ["--report", str(tmp_path / "hcl.bin"), "--vtpm-bundle", str(tmp_path / "bundle.json")]
    rc, out = _cli(
        capsys, *files, "--simulated-root", str(sim_root), "--policy", str(policy),
        "--expect-report-data", report_data.hex(),
    )  # fmt: skip
    assert rc == 0, out
    names = [c["name"] for c in out["checks"]]  # type: ignore[attr-defined]
    assert {"tpm_quote_signature", "tpm_pcr_digest", "tpm_quote_nonce", "report_data"} <= set(
        names
    )
    assert "pcr11" in out["claims"]["measurements"]  # type: ignore[index]
    # a genuine Azure HCL report with another VM's genuine quote: the check is named
    message, signature, pcrs = _genuine_quote()
    (tmp_path / "foreign.json").write_bytes(
        VtpmBundle(message, signature, pcrs, (AZ / "vcek.pem").read_bytes()).to_bytes()
    )
    rc, out = _cli(
        capsys, "--report", str(AZ / "hcl-report.bin"), "--vtpm-bundle",
        str(tmp_path / "foreign.json"), "--at", "2025-06-01T00:00:00Z",
    )  # fmt: skip
    assert rc == 1 and out["error"]["check"] == "tpm_quote_signature"  # type: ignore[index]
    from sealserve.cli.main import main

    rc = main(["verify", "--report", str(TPM / "quote.bin"), "--platform", "sev-snp",
               "--vtpm-bundle", str(tmp_path / "foreign.json")])  # fmt: skip
    assert rc != 0
    assert "--vtpm-bundle goes with an Azure HCL report" in capsys.readouterr().err


# --- the producing side's edges -----------------------------------------------------


def test_vcek_chain_from_instance_metadata(sim_root: Path) -> None:
    """THIM's answer (JSON: vcekCert, certificateChain) becomes one PEM bundle; a
    missing field or an unreachable service is UnavailableError with a remedy."""
    import http.server
    import json
    import threading

    from sealserve.enclave.azure_vtpm import fetch_vcek_chain

    chain = simulated_chain_pem(sim_root).decode()
    first = chain.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")
    answers = {"/good": {"vcekCert": chain[:first], "certificateChain": chain[first:]},
               "/bad": {"tcbm": "x"}}  # fmt: skip
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Metadata"))
            body = json.dumps(answers.get(self.path, {})).encode()
            self.send_response(200 if self.path in answers else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        got = fetch_vcek_chain(f"{base}/good")
        assert got.count(b"BEGIN CERTIFICATE") == 3 and seen == ["true"]
        for path in ("/bad", "/missing"):
            with pytest.raises(UnavailableError, match="no VCEK chain") as err:
                fetch_vcek_chain(f"{base}{path}")
            assert "azure_vcek_chain" in (err.value.remedy or "")
    finally:
        server.shutdown()


def test_missing_tpm2_tools_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sealserve.enclave.azure_vtpm import Tpm2Tools

    monkeypatch.setenv("PATH", str(tmp_path))  # no tpm2-tools here
    with pytest.raises(UnavailableError, match="tpm2_nvread not found") as err:
        Tpm2Tools().nv_read(0x01400001)
    assert "tpm2-tools" in (err.value.remedy or "")


def test_a_report_not_from_the_paravisor_is_refused(vtpm: FakeParavisor, sim_root: Path) -> None:
    """An SNP report requested below VMPL 0 has the paravisor's MEASUREMENT but could bind
    a vTPM key of its own: refused."""
    saved = vtpm.snp
    vtpm.snp = SimulatedPlatform(sim_root, measurement=b"\x42" * 48, vmpl=1)
    try:
        produced = _platform(vtpm, sim_root).report(b"\x05" * 64)
    finally:
        vtpm.snp = saved
    with pytest.raises(AttestationError) as err:
        _verify(produced.report, produced.certs, sim_root)
    assert err.value.check == "vtpm_vmpl"


def test_odd_bundle_fields_are_format_errors() -> None:
    report = (AZ / "hcl-report.bin").read_bytes()
    odd = [
        b'{"format":"sealserve-azure-vtpm","version":1,"quote":"","signature":"",'
        b'"pcrs":{"\xc2\xb2":"00"},"vcek_chain":""}',
        b"[" * 100_000,
    ]
    for bundle in odd:
        with pytest.raises(AttestationError) as err:
            verify_azure_vtpm_at_time(report, bundle, roots=TrustedRoots.amd(), now=SNP_AT)
        assert err.value.check == "vtpm_format"
