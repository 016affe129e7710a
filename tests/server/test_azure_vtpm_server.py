"""A server with ``attestation_platform = "azure-vtpm"`` on a real TPM implementation
(swtpm, driven through tpm2-tools) with a stand-in paravisor: GetEvidence answers with
an HCL report and vTPM quote that bind the nonce, the TLS key and the manifest."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from sealserve._proto import attestation_pb2 as apb
from sealserve.attestation.azure_vtpm import verify_azure_vtpm_at_time
from sealserve.attestation.binding import verify_report_data_binding
from sealserve.attestation.claims import Platform
from sealserve.attestation.evidence import Evidence
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.enclave.simulated import SimulatedPlatform
from sealserve.errors import ConfigError
from tests._vtpm import FakeParavisor, ParavisorThread, simulated_chain_pem, swtpm


@pytest.fixture(scope="module")
def azure(sim_root: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("azure")
    chain = tmp / "vcek-chain.pem"
    chain.write_bytes(simulated_chain_pem(sim_root))
    with swtpm(tmp) as (tpm, ak):
        paravisor = FakeParavisor(tpm, SimulatedPlatform(sim_root, measurement=b"\x42" * 48), ak)
        with ParavisorThread(paravisor) as thread:
            yield tpm.tcti, chain, thread


def _evidence(running: Any, nonce: bytes) -> Evidence:
    creds = grpc.ssl_channel_credentials(root_certificates=running.server.tls.cert_pem)
    options = [("grpc.ssl_target_name_override", "sealserve.attested")]
    with grpc.secure_channel(running.target, creds, options=options) as ch:
        get = ch.unary_unary(
            "/sealserve.v1.Attestation/GetEvidence",
            request_serializer=apb.GetEvidenceRequest.SerializeToString,
            response_deserializer=apb.GetEvidenceResponse.FromString,
        )
        return Evidence.from_bytes(get(apb.GetEvidenceRequest(nonce=nonce), timeout=60).evidence)


def test_server_attests_through_the_vtpm(
    start_server: Any, repo: Path, sim_root: Path, azure: Any
) -> None:
    tcti, chain, paravisor = azure
    running = start_server(
        model_repository=repo,
        attestation_platform="azure-vtpm",
        azure_vtpm_tcti=tcti,
        azure_vcek_chain=chain,
        # the test process itself runs with a .pth hook (the editable install)
        unsafe_allow_python_hooks=True,
    )
    for nonce in (b"a" * 32, b"b" * 32):
        evidence = _evidence(running, nonce)
        assert evidence.platform is Platform.AZURE_VTPM
        claims = verify_azure_vtpm_at_time(
            evidence.report, evidence.certs, roots=TrustedRoots.from_dir(sim_root),
            now=datetime.now(UTC),
        )  # fmt: skip
        verify_report_data_binding(
            claims.report_data, nonce=nonce, tls_spki=evidence.tls_spki,
            manifest=evidence.manifest, hpke_public_key=evidence.hpke_public_key,
            runtime_keys=evidence.runtime_keys,
        )  # fmt: skip
        assert evidence.manifest == running.server.manifest.to_bytes()
    assert paravisor.answered >= 2


def test_unreadable_vcek_chain_is_a_config_error(
    start_server: Any, repo: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "chain.pem"
    bad.write_text("not a certificate")
    for path, why in ((bad, "holds no PEM certificate"), (tmp_path / "nope", "cannot read")):
        with pytest.raises(ConfigError, match=f"azure_vcek_chain.*{why}"):
            start_server(
                model_repository=repo, attestation_platform="azure-vtpm", azure_vcek_chain=path,
                unsafe_allow_python_hooks=True,
            )  # fmt: skip
