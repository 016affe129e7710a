"""`sealserve verify --report`: every genuine vector verifies under a matching policy with
every check printed; every tampered copy is refused naming the failing check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sealserve.cli.main import main
from tests.conftest import VECTORS

SNP = VECTORS / "sev-snp"
TDX = VECTORS / "tdx"
DCAP = TDX / "dcap-qvl"
EXPECTED: dict[str, dict[str, Any]] = json.loads((VECTORS / "expected_fields.json").read_text())
SNP_AT = "2025-06-01T00:00:00Z"  # inside every VCEK/VLEK's validity
TDX_AT = "2026-06-01T00:00:00Z"  # inside every PCK chain's validity
DCAP_AT = "2025-06-20T00:00:00Z"  # inside every window of the dcap-qvl collateral

# report -> the certificate options that go with it
SNP_VECTORS: dict[str, list[str]] = {
    "go-sev-guest/attestation.bin": ["--vcek", str(SNP / "go-sev-guest/vcek.testcer")],
    "virtee-sev/report_milan.bin": [
        "--vcek", str(SNP / "virtee-sev/vcek_milan.der"),
        "--cert-chain", str(SNP / "virtee-sev/cert_chain_milan.pem"),
    ],
    "trustee/test-report.bin": [
        "--vcek", str(SNP / "trustee/test-vcek.der"),
        "--cert-chain", str(SNP / "trustee/milan_ask_ark_asvk.pem"),
    ],
    "trustee/test-vlek-report.bin": ["--vcek", str(SNP / "trustee/test-vlek.der")],
    "trustee/az-snp-vtpm/hcl-report.snp.bin": [
        "--cert-chain", str(SNP / "trustee/az-snp-vtpm/vcek.pem"),
    ],
}  # fmt: skip
TDX_VECTORS = sorted(EXPECTED["tdx"])


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["verify", "--json", *args])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def _policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text("version = 1\n" + text)
    return str(path)


def _snp_policy(tmp_path: Path, rel: str) -> str:
    fields = EXPECTED["sev-snp"][f"sev-snp/{rel}"]
    debug = "allow_debug = true\n" if fields["policy_debug"] else ""
    # The vector's own TCB as the floor (the default floor, bl 3 / snp 8, refuses the
    # oldest vector, go-sev-guest's bl 2 / snp 5).
    tcb = fields["reported_tcb"]
    floor = f"min_tcb = {{ bl = {tcb['bl']}, snp = {tcb['snp']}, ucode = {tcb['ucode']} }}\n"
    return _policy(
        tmp_path,
        f'platforms = ["sev-snp"]\n{debug}[sev-snp]\nmeasurement = ["{fields["measurement"]}"]\n'
        + floor,
    )


@pytest.mark.parametrize("rel", sorted(SNP_VECTORS))
def test_genuine_snp_report_verifies_and_prints_every_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str
) -> None:
    policy = _snp_policy(tmp_path, rel)
    rc, report = _verify(
        capsys, "--report", str(SNP / rel), *SNP_VECTORS[rel], "--at", SNP_AT, "--policy", policy
    )
    assert rc == 0, report
    names = [c["name"] for c in report["checks"]]
    for step in ("report_format", "vcek_signature", "validity_period", "report_signature"):
        assert step in names
    assert names[-1] == "policy" and report["checks"][-1]["passed"] is True
    assert (
        report["claims"]["measurements"]["measurement"]
        == (EXPECTED["sev-snp"][f"sev-snp/{rel}"]["measurement"])
    )
    # report_data binding is not assumed for a raw report
    binding = next(c for c in report["checks"] if c["name"] == "report_data_binding")
    assert binding["passed"] is None


@pytest.mark.parametrize("rel", sorted(SNP_VECTORS))
def test_tampered_snp_report_names_the_failing_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str
) -> None:
    tampered = SNP / rel.replace(".bin", ".tampered.bin")
    rc, report = _verify(capsys, "--report", str(tampered), *SNP_VECTORS[rel], "--at", SNP_AT)
    assert rc == 1
    assert report["error"]["check"] == "report_signature"


def test_azure_hcl_report_binds_the_vtpm_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = "trustee/az-snp-vtpm/hcl-report.snp.bin"
    hcl = SNP / "trustee/az-snp-vtpm/hcl-report.bin"
    args = ["--cert-chain", str(SNP / "trustee/az-snp-vtpm/vcek.pem"), "--at", SNP_AT]
    rc, report = _verify(
        capsys, "--report", str(hcl), *args, "--policy", _snp_policy(tmp_path, rel)
    )
    assert rc == 0, report
    names = [c["name"] for c in report["checks"]]
    assert names[1] == "hcl_format" and "hcl_runtime_binding" in names
    assert report["claims"]["fields"]["vtpm_ak_pub"]["kid"] == "HCLAkPub"
    # Runtime data edited (the vTPM key swapped): the binding check names it.
    data = bytearray(hcl.read_bytes())
    at = data.index(b'"HCLAkPub"') + 40
    data[at] ^= 1
    edited = tmp_path / "hcl-edited.bin"
    edited.write_bytes(bytes(data))
    rc, report = _verify(capsys, "--report", str(edited), *args)
    assert rc == 1 and report["error"]["check"] == "hcl_runtime_binding"
    # The SNP report inside, tampered: its signature fails.
    data = bytearray(hcl.read_bytes())
    data[0x20 + 0x90] ^= 1
    edited.write_bytes(bytes(data))
    rc, report = _verify(capsys, "--report", str(edited), *args)
    assert rc == 1 and report["error"]["check"] == "report_signature"


def _tdx_policy(tmp_path: Path, rel: str, extra: str = "") -> str:
    fields = EXPECTED["tdx"][rel]
    debug = "allow_debug = true\n" if fields["td_debug"] else ""
    return _policy(
        tmp_path, f'platforms = ["tdx"]\n{debug}[tdx]\nmrtd = ["{fields["mrtd"]}"]\n{extra}'
    )


@pytest.mark.parametrize("rel", TDX_VECTORS)
def test_genuine_tdx_quote_verifies_and_prints_every_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str
) -> None:
    policy = _tdx_policy(tmp_path, rel)
    rc, report = _verify(capsys, "--report", str(VECTORS / rel), "--at", TDX_AT, "--policy", policy)
    assert rc == 0, report
    by_name = {c["name"]: c["passed"] for c in report["checks"]}
    for step in ("pck_chain", "qe_report_signature", "qe_identity", "quote_signature"):
        assert by_name[step] is True
    assert by_name["tcb_status"] is None  # no collateral: shown, not claimed


@pytest.mark.parametrize("rel", TDX_VECTORS)
def test_tampered_tdx_quote_names_the_failing_check(
    capsys: pytest.CaptureFixture[str], rel: str
) -> None:
    tampered = VECTORS / rel.replace(".dat", ".tampered.bin")
    rc, report = _verify(capsys, "--report", str(tampered), "--at", TDX_AT)
    assert rc == 1 and report["error"]["check"] == "quote_signature"


def _dcap_mrtd() -> str:
    from sealserve.attestation.tdx_quote import TdxQuote

    return TdxQuote.from_bytes((DCAP / "tdx_quote").read_bytes()).td_report.mrtd.hex()


def test_dcap_quote_with_collateral_is_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _policy(
        tmp_path,
        f'platforms = ["tdx"]\n[tdx]\nmrtd = ["{_dcap_mrtd()}"]\ntcb_status = ["UpToDate"]\n',
    )
    args = [
        "--report",
        str(DCAP / "tdx_quote"),
        "--collateral",
        str(DCAP / "tdx_quote_collateral.json"),
    ]
    rc, report = _verify(capsys, *args, "--at", DCAP_AT, "--policy", policy)
    assert rc == 0, report
    assert report["claims"]["fields"]["tcb_status"] == "UpToDate"
    assert report["claims"]["fields"]["collateral_verified"] is True
    by_name = {c["name"]: c["passed"] for c in report["checks"]}
    assert by_name["collateral_signature"] is True and by_name["crl"] is True
    # The same policy without collateral: the tcb_status rule refuses.
    rc, report = _verify(capsys, *args[:2], "--at", DCAP_AT, "--policy", policy)
    assert rc == 1 and report["error"]["check"] == "tdx.tcb_status_in"


def _edited_collateral(tmp_path: Path, key: str, edit: Any) -> str:
    doc = json.loads((DCAP / "tdx_quote_collateral.json").read_text())
    doc[key] = edit(doc[key])
    path = tmp_path / f"collateral-{key}.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize(
    ("key", "edit", "check"),
    [
        # One byte of the signed TCB info: UpToDate -> UpToDatf.
        ("tcb_info", lambda s: s.replace('"UpToDate"', '"UpToDatf"', 1), "collateral_format"),
        # One byte of the signed TCB info that still parses: the tcbEvaluationDataNumber.
        ("tcb_info", lambda s: s.replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18'), "collateral_signature"),
        ("qe_identity", lambda s: s.replace('"isvsvn":4', '"isvsvn":3'), "collateral_signature"),
        ("tcb_info_signature", lambda s: s[:-2] + ("00" if s[-2:] != "00" else "01"), "collateral_signature"),
        ("qe_identity_signature", lambda s: "01" + s[2:], "collateral_signature"),
        ("pck_crl", lambda s: s[:-2] + ("00" if s[-2:] != "00" else "01"), "crl"),
        ("root_ca_crl", lambda s: s[:-2] + ("00" if s[-2:] != "00" else "01"), "crl"),
    ],
)  # fmt: skip
def test_edited_collateral_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, edit: Any, check: str
) -> None:
    collateral = _edited_collateral(tmp_path, key, edit)
    rc, report = _verify(
        capsys, "--report", str(DCAP / "tdx_quote"), "--collateral", collateral, "--at", DCAP_AT
    )
    assert rc == 1
    assert report["error"]["check"] == check, report["error"]


@pytest.mark.parametrize(
    ("at", "check"),
    [
        ("2025-06-19T10:20:00Z", "collateral_freshness"),  # before the QE identity's issueDate
        ("2025-06-19T09:00:00Z", "crl"),  # before the PCK CRL's thisUpdate
        ("2025-07-25T00:00:00Z", "crl"),  # after the PCK CRL's nextUpdate
    ],
)
def test_collateral_outside_its_window_is_refused(
    capsys: pytest.CaptureFixture[str], at: str, check: str
) -> None:
    rc, report = _verify(
        capsys, "--report", str(DCAP / "tdx_quote"),
        "--collateral", str(DCAP / "tdx_quote_collateral.json"), "--at", at,
    )  # fmt: skip
    assert rc == 1 and report["error"]["check"] == check, report["error"]


def test_collateral_for_another_fmspc_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # SPR_E4 has FMSPC 50806f000000; the collateral is for b0c06f000000.
    rc, report = _verify(
        capsys, "--report", str(TDX / "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"),
        "--collateral", str(DCAP / "tdx_quote_collateral.json"), "--at", DCAP_AT,
    )  # fmt: skip
    assert rc == 1 and report["error"]["check"] == "tcb_info"
    assert "FMSPC b0c06f000000" in report["error"]["message"]


def test_collateral_signed_by_a_foreign_chain_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The PCK chain's intermediate is not the TCB Signing certificate.
    pck_chain = json.loads((DCAP / "tdx_quote_collateral.json").read_text())["pck_crl_issuer_chain"]
    collateral = _edited_collateral(tmp_path, "tcb_info_issuer_chain", lambda s: pck_chain)
    rc, report = _verify(
        capsys, "--report", str(DCAP / "tdx_quote"), "--collateral", collateral, "--at", DCAP_AT
    )
    assert rc == 1 and report["error"]["check"] == "collateral_signature"
    assert "expected 'Intel SGX TCB Signing'" in report["error"]["message"]


def test_expect_report_data(capsys: pytest.CaptureFixture[str]) -> None:
    rel = "tdx/trustee/tdx_quote_5.dat"
    want = EXPECTED["tdx"][rel]["report_data"]
    rc, report = _verify(
        capsys, "--report", str(VECTORS / rel), "--at", TDX_AT, "--expect-report-data", want
    )
    assert rc == 0 and any(c["name"] == "report_data" and c["passed"] for c in report["checks"])
    rc, report = _verify(
        capsys, "--report", str(VECTORS / rel), "--at", TDX_AT, "--expect-report-data", "00" * 64
    )
    assert rc == 1 and report["error"]["check"] == "report_data"


def test_snp_report_with_trailing_bytes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = "trustee/test-report.bin"
    longer = tmp_path / "report.bin"
    longer.write_bytes((SNP / rel).read_bytes() + b"\0")
    rc, report = _verify(capsys, "--report", str(longer), *SNP_VECTORS[rel], "--at", SNP_AT)
    assert rc == 1 and "1184 bytes, got 1185" in report["error"]["message"]


def test_cert_chain_cannot_bring_its_own_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sim_root: Path
) -> None:
    rel = "trustee/test-report.bin"
    foreign = tmp_path / "chain.pem"
    foreign.write_bytes((sim_root / "ask.pem").read_bytes() + (sim_root / "ark.pem").read_bytes())
    rc, report = _verify(
        capsys, "--report", str(SNP / rel), "--vcek", str(SNP / "trustee/test-vcek.der"),
        "--cert-chain", str(foreign), "--at", SNP_AT,
    )  # fmt: skip
    assert rc == 1 and report["error"]["check"] == "cert_chain"


def test_table_output_names_checks_and_claims(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["verify", "--report", str(VECTORS / "tdx/trustee/tdx_quote_4.dat"), "--at", TDX_AT])
    out = capsys.readouterr().out
    assert rc == 1  # a debug TD: the default policy refuses it
    assert "quote_signature          PASS" in out
    assert "policy                   FAIL   DEBUG attribute is set" in out
    assert "td_debug         True" in out and "result: REJECTED" in out
