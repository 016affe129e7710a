"""A broker restart during a server's key wait ends with the server serving.

Everything as processes on loopback, on the simulated platform: the broker with a
lasting TLS identity (`sealserve broker init-tls`), an encrypted model whose key it
holds, and `sealserve serve` waiting for that key while the broker hangs (SIGSTOP: the
server's calls time out mid-exchange), is killed, and comes back with the same identity.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sealserve.cli.main import main
from tests.broker.conftest import ISSUER, admin_token
from tests.conftest import sealserve_cmd, sealserve_env
from tests.deploy.conftest import free_port

pytestmark = [
    pytest.mark.filterwarnings("ignore::sealserve.attestation.policy.UnsafePolicyWarning"),
]


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                sealserve_cmd(*args), env=sealserve_env(), stdout=out, stderr=subprocess.STDOUT
            )
        self.started.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        (path,) = [log for p, log in self.started if p is proc]
        return path.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def _until(what: str, check: object, proc: subprocess.Popen[bytes], procs: Procs,
           timeout: float = 90) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert proc.poll() is None, f"exited while waiting for {what}:\n{procs.log(proc)}"
        assert time.monotonic() < deadline, f"no {what}:\n{procs.log(proc)}"
        time.sleep(0.2)


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)
        except grpc.RpcError:
            return -1


def test_a_broker_restart_during_the_key_wait_ends_with_the_server_serving(
    tmp_path: Path,
    procs: Procs,
    sim_root: Path,
    admin_issuer: tuple[object, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sealserve import demo
    from sealserve.client import Client

    issuer, jwks = admin_issuer
    broker_dir = tmp_path / "broker"
    assert main(["broker", "init-tls", "--out", str(broker_dir)]) == 0
    assert main(["broker", "init-master-key", "--out", str(broker_dir / "master.key")]) == 0
    cert = broker_dir / "broker-cert.pem"
    broker_port = free_port()
    (broker_dir / "broker.toml").write_text(
        f'port = {broker_port}\nstore_file = "keys.sealed"\nmaster_key_file = "master.key"\n'
        'tls_cert_file = "broker-cert.pem"\ntls_key_file = "broker-key.pem"\n'
        f'unsafe_simulated_root_dir = "{sim_root}"\nlog_format = "text"\n'
        f'[admin]\nissuer = "{ISSUER}"\njwks_file = "{jwks}"\n'
    )
    serve_broker = ("broker", "serve", "--config", str(broker_dir / "broker.toml"))
    ready = tmp_path / "broker-ready.json"
    broker = procs.start("broker", *serve_broker, "--ready-file", str(ready))
    _until("broker ready file", ready.exists, broker, procs)
    assert json.loads(ready.read_text())["tls_cert_pem"] == cert.read_text()
    assert "made in memory" not in procs.log(broker)

    # The owner encrypts the demo model and deposits its key with a policy pinning the
    # (simulated) launch measurement of this build.
    models = tmp_path / "models"
    shutil.copytree(demo.repository(), models)
    (tmp_path / "admin.jwt").write_text(admin_token(issuer))  # type: ignore[arg-type]
    policy = tmp_path / "policy.toml"
    m = subprocess.run(sealserve_cmd("measure", "--launch", "simulated", "--policy-out",
                                     str(policy)),
                       env=sealserve_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert m.returncode == 0, m.stderr
    onnx = models / "digits" / "1" / "model.onnx"
    assert main(["encrypt", str(onnx), "--key-id", "digits-v1", "--out",
                 str(onnx.with_name("model.sealed")), "--broker", f"127.0.0.1:{broker_port}",
                 "--broker-ca", str(cert), "--broker-server-name", "localhost",
                 "--admin-token-file", str(tmp_path / "admin.jwt"), "--broker-policy",
                 str(policy), "--broker-root", "unsafe-simulated", "--no-progress"]) == 0  # fmt: skip
    onnx.unlink()
    capsys.readouterr()

    # The broker hangs: the server's first calls time out in the middle of the exchange.
    broker.send_signal(signal.SIGSTOP)
    health_port = free_port()
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{models}"\nport = 0\nhealth_port = {health_port}\n'
        f'unsafe_disable_auth = true\nattestation_platform = "simulated"\n'
        f'simulated_platform_dir = "{sim_root}"\nlog_format = "text"\n'
        f'[key_broker]\ntarget = "127.0.0.1:{broker_port}"\nca_file = "{cert}"\n'
        'server_name = "localhost"\ntimeout_seconds = 1\nmax_backoff_s = 1\n'
    )
    server_ready = tmp_path / "server-ready.json"
    server = procs.start("server", "serve", "--config", str(cfg), "--ready-file",
                         str(server_ready))  # fmt: skip
    _until("a retried key wait", lambda: procs.log(server).count("waiting for key") >= 2,
           server, procs)  # fmt: skip
    assert _health(health_port) == health_pb2.HealthCheckResponse.NOT_SERVING

    # Killed while hung, then started again with the same identity, store and port.
    broker.kill()
    broker.wait(30)
    time.sleep(1.5)  # the server meets a closed port too
    assert server.poll() is None, procs.log(server)
    assert _health(health_port) == health_pb2.HealthCheckResponse.NOT_SERVING
    ready.unlink()
    broker = procs.start("broker", *serve_broker, "--ready-file", str(ready))
    _until("broker ready again", ready.exists, broker, procs)

    _until("the server serving", server_ready.exists, server, procs)
    assert _health(health_port) == health_pb2.HealthCheckResponse.SERVING
    log = procs.log(server)
    assert "released by the key broker" in log
    assert "broker_ca_pem" not in log
    info = json.loads(server_ready.read_text())
    x, y = demo.holdout()
    with Client(f"127.0.0.1:{info['port']}", root_certificates=info["tls_cert_pem"].encode()) as c:
        out = c.infer("digits", {"input": x[:32]})
    assert float(np.mean(out["label"] == y[:32])) > 0.8


@pytest.mark.parametrize("workers", [1, 2])
def test_wait_s_ends_the_wait_with_one_error_line(
    tmp_path: Path, sim_root: Path, workers: int
) -> None:
    """One line an operator can act on, however many workers met the error."""
    from sealserve import demo

    models = tmp_path / "models"
    shutil.copytree(demo.repository(), models)
    onnx = models / "digits" / "1" / "model.onnx"
    assert main(["encrypt", str(onnx), "--key-id", "digits-v1", "--out",
                 str(onnx.with_name("model.sealed")), "--key-file", str(tmp_path / "k.key"),
                 "--no-progress"]) == 0  # fmt: skip
    onnx.unlink()
    cfg = tmp_path / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{models}"\nport = 0\nunsafe_disable_auth = true\n'
        f'workers = {workers}\nstate_store = "sqlite://{tmp_path / "state.db"}"\n'
        f'attestation_platform = "simulated"\nsimulated_platform_dir = "{sim_root}"\n'
        f'log_format = "text"\n[key_broker]\ntarget = "127.0.0.1:{free_port()}"\n'
        "wait_s = 3\nmax_backoff_s = 1\n"
    )
    out = subprocess.run(sealserve_cmd("serve", "--config", str(cfg)), env=sealserve_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: key broker 127.0.0.1:")
    assert "no key 'digits-v1' within [key_broker] wait_s = 3 s" in last
    assert "(fix: Start or fix the key broker, check [key_broker] target and ca_file" in last
    assert out.stderr.count("error: key broker") == 1, out.stderr
