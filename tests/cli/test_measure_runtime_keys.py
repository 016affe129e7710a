"""Reference values from a build and a config alone: `sealserve measure`, run before the
first start, gives the manifest the server then attests, with [auth], [limits] and
[defense] on (issue 21 item 1). The keys the server makes at first start (the audit
key) are attested beside the manifest, in the runtime keys record."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealserve.attestation.evidence import Evidence
from sealserve.attestation.policy import UnsafeAllowSimulated, UnsafePolicyWarning
from sealserve.attestation.runtime_keys import RuntimeKeys
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.auth import TokenIssuer, generate_keypair
from sealserve.canonical import canonical_json
from sealserve.defense.audit.log import load_public_key
from sealserve.errors import VerificationError
from tests.conftest import sealserve_cmd, sealserve_env, serve_until_ready

ISSUER = "https://issuer.example.com"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sealserve_cmd(*args), env=sealserve_env(), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def write_config(work: Path, sim_root: Path) -> Path:
    """A server config with every table on: [auth], [limits], [defense] (sealed state,
    audit log, detection, watermark) and REST, on the simulated platform."""
    from sealserve import demo

    shutil.copytree(demo.repository(), work / "models")
    private_pem, jwks = generate_keypair("ES256")
    (work / "jwks.json").write_text(json.dumps(jwks))
    issuer = TokenIssuer.from_pem(private_pem, issuer=ISSUER, audience="sealserve")
    token = issuer.issue("auditor", tier="standard", scopes=["audit"], tos_version="2026-11",
                         ttl=3600)  # fmt: skip
    (work / "audit.token").write_text(token)
    cfg = work / "sealserve.toml"
    cfg.write_text(f"""\
model_repository = "models"
port = 0
attestation_platform = "simulated"
simulated_platform_dir = "{sim_root}"
state_store = "sqlite://state.db"
log_format = "text"

[rest]
port = 0

[auth]
audience = "sealserve"
required_tos_version = "2026-11"

[[auth.issuers]]
issuer = "{ISSUER}"
jwks_file = "jwks.json"

[limits.tiers.standard]
rate = 50
burst = 100
per_day = 10000

[defense]
state_dir = "state"

[defense.audit]
dir = "audit"

[defense.profiles.standard]
round = 3
noise = {{ dist = "laplace", scale = 0.02 }}
watermark = {{ fraction = 0.01 }}

[defense.models.digits]
output = "probabilities"
label = "label"
profile = "standard"
reference = "{demo.reference_path()}"
""")
    return cfg


@dataclass
class Served:
    target: str
    rest_target: str
    work: Path
    measured_before: dict[str, object]
    digest_before: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sim_root: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("measure-first-start")
    cfg = write_config(work, sim_root)
    # Before the first start: nothing in state_dir exists, and measure makes nothing.
    as_json = _run("measure", "--config", str(cfg), "--json")
    assert as_json.returncode == 0, as_json.stderr
    plain = _run("measure", "--config", str(cfg), "--launch", "simulated",
                 "--policy-out", str(work / "policy.toml"))  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert "warning" not in (plain.stdout + plain.stderr).lower()
    assert not (work / "state").exists() and not (work / "audit").exists()
    assert not (work / "state.db").exists()
    digest = plain.stdout.split("manifest sha256")[1].split()[0]
    ready = work / "ready.json"
    proc, info = serve_until_ready(cfg, ready)
    try:
        yield Served(
            f"127.0.0.1:{info['port']}", f"127.0.0.1:{info['rest_port']}", work,
            json.loads(as_json.stdout), digest,
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def _attest(served: Served, sim_root: Path, protocol: str) -> object:
    from sealserve.client.attested import attest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePolicyWarning)
        return attest(
            served.target if protocol == "grpc" else served.rest_target,
            policy=UnsafeAllowSimulated(), roots=TrustedRoots.from_dir(sim_root),
            protocol=protocol,
        )  # fmt: skip


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_measure_before_first_start_equals_the_attested_manifest(
    served: Served, sim_root: Path, protocol: str
) -> None:
    endpoint = _attest(served, sim_root, protocol)
    evidence = endpoint.evidence  # type: ignore[attr-defined]
    # The first start made the audit key; the manifest does not name it...
    assert (served.work / "state" / "audit-public.pem").is_file()
    attested = json.loads(evidence.manifest)
    assert attested == served.measured_before
    assert evidence.manifest == canonical_json(served.measured_before)
    assert hashlib.sha256(evidence.manifest).hexdigest() == served.digest_before
    assert endpoint.claims.manifest_digest.hex() == served.digest_before  # type: ignore[attr-defined]
    # ... every table was on ...
    config = attested["config"]
    assert config["auth"] != "disabled" and config["limits"] and config["defense"]["audit"]
    assert attested["extra"]["token_keys"]
    # ... and the runtime keys record, verified with the evidence, carries it.
    pem = (served.work / "state" / "audit-public.pem").read_bytes()
    assert endpoint.runtime_keys.audit_public_key == load_public_key(pem)  # type: ignore[attr-defined]


def test_measure_after_first_start_still_agrees(served: Served) -> None:
    again = _run("measure", "--config", str(served.work / "sealserve.toml"), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == served.measured_before


def _verify(tmp_path: Path, sim_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`sealserve verify ARGS` under a policy that trusts the simulated root."""
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\nunsafe_allow_simulated = true\n")
    return _run("verify", *args, "--policy", str(policy), "--simulated-root", str(sim_root))


def test_verify_prints_the_runtime_keys_and_writes_the_audit_key(
    served: Served, sim_root: Path, tmp_path: Path
) -> None:
    pem = tmp_path / "audit-public.pem"
    v = _verify(tmp_path, sim_root, "--endpoint", served.target, "--audit-key-out", str(pem),
                "--json")  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    report = json.loads(v.stdout)
    state_pem = (served.work / "state" / "audit-public.pem").read_bytes()
    key = load_public_key(state_pem)
    assert report["runtime_keys"]["audit"]["public_key"] == key.hex()
    assert report["claims"]["fields"]["audit_key"].startswith("sha256:")
    assert load_public_key(pem.read_bytes()) == key
    # What an auditor does next: the live log verifies against the attested key.
    audit = _run("audit", "verify", str(served.work / "audit"), "--public-key", str(pem),
                 "--allow-unsigned-tail")  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _forged(evidence: Evidence) -> Evidence:
    """The same evidence with another audit key in its runtime keys record (what an
    operator who wants its own key trusted, or a machine in the middle, would send)."""
    other = RuntimeKeys(audit_public_key=b"\x07" * 32).to_bytes()
    assert other != evidence.runtime_keys
    return dataclasses.replace(evidence, runtime_keys=other)


def test_client_refuses_a_runtime_keys_record_the_report_does_not_bind(
    served: Served, sim_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sealserve.client.attested as attested

    real = attested.get_evidence
    monkeypatch.setattr(attested, "get_evidence", lambda *a, **k: _forged(real(*a, **k)))
    with pytest.raises(VerificationError, match="runtime keys") as err:
        _attest(served, sim_root, "grpc")
    assert err.value.check == "report_data_binding"


def test_verify_refuses_saved_evidence_with_a_swapped_record(
    served: Served, sim_root: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "evidence.bin"
    ok = _verify(tmp_path, sim_root, "--endpoint", served.target, "--save", str(saved))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "audit pubkey" in ok.stdout
    assert "runtime_keys             info   audit key sha256:" in ok.stdout
    forged = tmp_path / "forged.bin"
    forged.write_bytes(_forged(Evidence.from_bytes(saved.read_bytes())).to_bytes())
    pem = tmp_path / "never.pem"
    v = _verify(tmp_path, sim_root, "--evidence", str(forged), "--audit-key-out", str(pem))
    assert v.returncode == 1, v.stdout + v.stderr
    assert "report_data_binding      FAIL" in v.stdout and "runtime keys" in v.stdout
    assert "result: REJECTED" in v.stdout and not pem.exists()


def test_the_policy_measure_wrote_before_the_first_start_admits_the_server(
    served: Served, sim_root: Path
) -> None:
    policy = served.work / "policy.toml"
    assert f'manifest_digests = ["{served.digest_before}"]' in policy.read_text()
    v = _run("verify", "--endpoint", served.target, "--policy", str(policy),
             "--simulated-root", str(sim_root))  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"manifest sha256  {served.digest_before}" in v.stdout


def test_audit_head_checks_the_head_against_the_attested_audit_key(
    served: Served, sim_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\nunsafe_allow_simulated = true\n")
    args = ["audit", "head", "--target", served.target, "--policy", str(policy),
            "--simulated-root", str(sim_root), "--token-file", str(served.work / "audit.token"),
            "-o", str(tmp_path / "head.json")]  # fmt: skip
    ok = _run(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "head signed by the attested audit key sha256:" in ok.stderr
    # A head signed by another key than the attested one (e.g. a log kept by something
    # else than the attested server) is refused.
    import sealserve.client.client as client_module
    from sealserve.cli.main import main

    real = client_module.open_channel

    def other_key(*a: object, **k: object) -> object:
        channel, endpoint = real(*a, **k)  # type: ignore[arg-type]
        claims = dataclasses.replace(
            endpoint.claims, runtime_keys=RuntimeKeys(audit_public_key=b"\x07" * 32)
        )
        return channel, dataclasses.replace(endpoint, claims=claims)

    monkeypatch.setattr(client_module, "open_channel", other_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePolicyWarning)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert "not by the attested audit key (sha256:" in err
