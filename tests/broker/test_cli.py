"""`sealserve encrypt --broker`, `sealserve broker ...` and `broker serve` as a process."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealserve.cli.main import main
from sealserve.enclave.key_release import fetch_model_key
from sealserve.enclave.model_file import decrypt_to_bytes
from sealserve.enclave.simulated import SimulatedPlatform
from tests.broker.conftest import AMD_POLICY, ISSUER, PINNED_POLICY, Running, admin_token
from tests.conftest import sealserve_cmd, sealserve_env

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
    pytest.mark.filterwarnings("ignore::sealserve.broker.app.UnsafeSimulatedRootWarning"),
]


def _conn(running: Running, tmp_path: Path) -> list[str]:
    ca = tmp_path / "broker-ca.pem"
    ca.write_bytes(running.ca_pem)
    token = tmp_path / "admin.jwt"
    token.write_text(running.token)
    return ["--broker", running.target, "--broker-ca", str(ca), "--admin-token-file", str(token)]


def test_encrypt_deposits_the_key_and_the_enclave_fetches_it(
    start_broker: Callable[..., Running],
    tmp_path: Path,
    sim_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_broker()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07 pretend onnx " * 3000)
    policy = tmp_path / "policy.toml"
    policy.write_text(PINNED_POLICY)
    out_dir = tmp_path / "sealed"
    out_dir.mkdir()
    out = out_dir / "model.sealed"
    conn = _conn(running, tmp_path)
    argv = ["encrypt", str(model), "--key-id", "m1", "--out", str(out), "--no-progress"]
    argv += [*conn, "--broker-policy", str(policy), "--broker-root", "unsafe-simulated"]
    assert main(argv) == 0
    assert "data key:         deposited at the key broker" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.key"))  # no key file anywhere

    hpke = X25519PrivateKey.generate()
    key = fetch_model_key(
        running.target,
        key_id="m1",
        platform=SimulatedPlatform(sim_root),
        tls_spki=b"spki",
        manifest=b"manifest",
        hpke_private_key=hpke,
        broker_ca_pem=running.ca_pem,
    )
    with out.open("rb") as f:
        assert decrypt_to_bytes(f, key=key) == model.read_bytes()

    assert main(["broker", "list", *conn]) == 0
    listing = capsys.readouterr().out
    assert "m1\tpolicy set\troots=unsafe-simulated (UNSAFE: simulated root)" in listing
    assert main(["broker", "revoke", "m1", *conn]) == 0
    assert main(["broker", "list", *conn]) == 0
    assert "m1\tREVOKED" in capsys.readouterr().out


def test_encrypt_needs_exactly_one_destination_and_a_token(
    start_broker: Callable[..., Running], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_broker()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 100)
    out = tmp_path / "out" / "m.sealed"
    out.parent.mkdir()
    base = ["encrypt", str(model), "--key-id", "k", "--out", str(out)]
    assert main(base) == 1
    assert "give exactly one of --key-file PATH and --broker HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--broker", running.target]) == 1
    assert "no admin token" in capsys.readouterr().err
    conn = _conn(running, tmp_path)
    bad = tmp_path / "bad.jwt"
    bad.write_text(admin_token(running.issuer, scopes=("infer",)))
    assert main([*base, *conn[:4], "--admin-token-file", str(bad)]) == 1
    assert "lacks the 'admin' scope" in capsys.readouterr().err
    assert not out.exists() and not list(out.parent.iterdir())  # nothing left behind
    assert running.broker.list_keys() == []


def test_broker_add_key_and_set_policy_from_files(
    start_broker: Callable[..., Running], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sealserve.enclave.key_file import KeyFile

    running = start_broker()
    conn = _conn(running, tmp_path)
    keys = tmp_path / "keys"
    keys.mkdir()
    key = KeyFile.generate("kf")
    key.write(keys / "kf.key", encrypted_output=tmp_path / "elsewhere" / "m.sealed")
    assert main(["broker", "add-key", "kf", "--key-file", str(keys / "kf.key"), *conn]) == 0
    assert "(no policy yet: never released)" in capsys.readouterr().out
    policy = tmp_path / "p.toml"
    policy.write_text(AMD_POLICY)
    assert (
        main(["broker", "set-policy", "kf", "--policy", str(policy), "--root", "amd", *conn]) == 0
    )
    record = running.broker.store.get("kf")
    assert record is not None and record.key == key.key and "sev-snp" in record.policy_toml
    policy.write_text("platforms = 3\n")
    assert main(["broker", "set-policy", "kf", "--policy", str(policy), *conn]) == 1
    assert "platforms" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("policy", "roots", "missing"),
    [
        ("manifest_digests = ['" + "00" * 32 + "']\n", ["amd"], "platforms: the policy names no"),
        ("platforms = ['sev-snp']\n", ["amd"], "launch measurement: sev-snp needs [sev-snp]"),
        (AMD_POLICY, [], "roots: sev-snp evidence needs the 'amd' root"),
        (AMD_POLICY, ["unsafe-simulated"], "roots: sev-snp evidence needs the 'amd' root"),
        (
            "platforms = ['tdx']\n[tdx]\nmrtd = ['" + "11" * 48 + "']\n",
            ["intel"],
            "launch measurement: tdx needs [tdx] rtmr0, rtmr1, rtmr2",
        ),
        (
            PINNED_POLICY.replace("[sev-snp]", "[tdx]").replace("measurement", "mrtd"),
            ["unsafe-simulated"],
            "launch measurement: simulated-sev-snp needs",
        ),
    ],
)
def test_set_policy_refuses_an_incomplete_policy_naming_the_missing_part(
    start_broker: Callable[..., Running],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    policy: str,
    roots: list[str],
    missing: str,
) -> None:
    running = start_broker()
    conn = _conn(running, tmp_path)
    running.broker.add_key("k", None, actor="test")
    path = tmp_path / "p.toml"
    path.write_text(policy)
    root_args = [a for r in roots for a in ("--root", r)]
    argv = ["broker", "set-policy", "k", "--policy", str(path), *root_args, *conn]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "release policy is incomplete" in err and missing in err
    assert running.broker.store.get("k").policy_toml == ""  # type: ignore[union-attr]
    # The named unsafe flag takes it, and the broker's log says UNSAFE.
    assert main([*argv, "--unsafe-allow-incomplete-policy"]) == 0
    assert running.broker.store.get("k").policy_toml == policy  # type: ignore[union-attr]


def test_broker_serve_runs_as_a_process(
    tmp_path: Path, admin_issuer: tuple[object, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    issuer, jwks = admin_issuer
    assert main(["broker", "init-master-key", "--out", str(tmp_path / "master.key")]) == 0
    config = tmp_path / "broker.toml"
    config.write_text(
        'port = 0\nstore_file = "keys.sealed"\nmaster_key_file = "master.key"\n'
        f'[admin]\nissuer = "{ISSUER}"\njwks_file = "{jwks}"\n'
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        sealserve_cmd("broker", "serve", "--config", str(config), "--ready-file", str(ready)),
        env=sealserve_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        (tmp_path / "ca.pem").write_text(info["tls_cert_pem"])
        (tmp_path / "t.jwt").write_text(admin_token(issuer))  # type: ignore[arg-type]
        conn = ["--broker", f"127.0.0.1:{info['port']}", "--broker-ca", str(tmp_path / "ca.pem")]
        conn += ["--admin-token-file", str(tmp_path / "t.jwt")]
        capsys.readouterr()
        assert main(["broker", "list", *conn]) == 0
        assert capsys.readouterr().out == "no keys\n"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert '"msg": "key broker listening on 127.0.0.1:' in err
    # No TLS files: the in-memory certificate, and a warning that restarts break pins.
    assert "changes at every restart" in err and "sealserve broker init-tls" in err
