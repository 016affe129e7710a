"""``workers = N`` (issue 17 item 3): N serving processes on one port behind one attested
identity. A client that verified one worker reaches every other with the same pinned
certificate and the same evidence; each worker keeps its own audit chain and sealed
ledger (one writer per file), which verify and read as one log; signals stop them all,
and a worker that dies takes the group down with a non-zero exit."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealserve.attestation.policy import UnsafeAllowSimulated, UnsafePolicyWarning
from sealserve.attestation.snp_certs import TrustedRoots
from sealserve.client import Client
from sealserve.defense.audit.chains import chains
from sealserve.defense.audit.verify import read_records
from sealserve.errors import ConfigError
from sealserve.server.settings import Settings
from sealserve.server.workers import reserve_port
from tests.conftest import sealserve_cmd, sealserve_env, serve_until_ready

# 4 rows a request: with marks on a fifth of cells, 96 rows leave the ledgers empty
# with probability 0.8**96 (24 single rows did 0.5% of the time: a flaky test).
ROWS = np.random.default_rng(7).uniform(0, 16, size=(96, 64)).astype(np.float32)


def _config(work: Path, sim_root: Path, *, defended: bool = True, rest: bool = True) -> Path:
    from sealserve import demo

    cfg = work / "sealserve.toml"
    text = (
        f'model_repository = "{demo.repository()}"\nport = 0\nworkers = 2\n'
        'log_format = "text"\nharden_process = false\nunsafe_disable_auth = true\n'
        f'attestation_platform = "simulated"\nsimulated_platform_dir = "{sim_root}"\n'
        'state_store = "sqlite://state.db"\n'
    )
    text += "metrics_port = 0\n"
    if rest:
        text += "[rest]\nport = 0\n"
    if defended:
        text += (
            '[defense]\nstate_dir = "state"\n[defense.audit]\ndir = "audit"\n'
            "[defense.profiles.marked]\nround = 3\nwatermark = { fraction = 0.2 }\n"
            '[defense.models.digits]\noutput = "probabilities"\nlabel = "label"\n'
            'profile = "marked"\n'
        )
    cfg.write_text(text)
    return cfg


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _spki_sha256(cert_pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _identity(target: str, sim_root: Path, protocol: str, row: int) -> tuple[str, str]:
    """Connect afresh (verify, then trust), infer once; the spki and manifest digest
    this connection was shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePolicyWarning)
        client = Client(target, policy=UnsafeAllowSimulated(), protocol=protocol,
                        roots=TrustedRoots.from_dir(sim_root))  # fmt: skip
    with client:
        out = client.infer("digits", {"input": ROWS[4 * row : 4 * row + 4]})
        assert out["probabilities"].shape == (4, 10)
        att = client.attestation
        assert att is not None and att.claims.simulated
        return _spki_sha256(att.certificate_pem), att.claims.manifest_digest.hex()


def test_workers_share_one_port_one_identity_and_log_per_worker(
    tmp_path: Path, sim_root: Path
) -> None:
    cfg = _config(tmp_path, sim_root)
    proc, info = serve_until_ready(cfg, tmp_path / "ready.json")
    try:
        workers = info["workers"]
        assert len(set(workers)) == 2 and info["pid"] not in workers
        assert all(_alive(pid) for pid in workers)
        grpc_target = f"127.0.0.1:{info['port']}"
        rest_target = f"127.0.0.1:{info['rest_port']}"
        seen = {_identity(grpc_target, sim_root, "grpc", i) for i in range(12)}
        seen |= {_identity(rest_target, sim_root, "http", i) for i in range(12, 24)}
        # One certificate and one evidence identity, whichever worker answered.
        assert len(seen) == 1, seen
        spki, _ = seen.pop()
        assert spki == _spki_sha256(info["tls_cert_pem"].encode())
        # One /metrics for the group: every worker's series, labelled by worker.
        scraped = _scrape(info["metrics_port"])
        assert scraped["sealserve_worker_up"] == {"1": 1.0, "2": 1.0}
        served = scraped["sealserve_requests_total"]
        assert set(served) == {"1", "2"} and sum(served.values()) == 24, served
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert not any(_alive(pid) for pid in workers), out[-3000:]
    # One audit chain per worker; both served some of the fresh connections.
    audit = tmp_path / "audit"
    found = chains(audit)
    assert [files[0].parent.name for files in found] == ["worker-1", "worker-2"]
    queries = [sum(r.get("kind") == "query" for r in read_records(files)) for files in found]
    assert all(q > 0 for q in queries), queries  # the kernel spread connections
    by_protocol = [
        {p: sum(r.get("protocol") == p for r in read_records(files)) for p in ("grpc", "rest")}
        for files in found
    ]
    # Each protocol's fresh connections reached both workers (REST's could not alone).
    assert all(c["grpc"] > 0 and c["rest"] > 0 for c in by_protocol), by_protocol
    assert sum(queries) == 24
    # The chains verify as one log (each on its own), signed by the one audit key.
    verify = subprocess.run(
        sealserve_cmd("audit", "verify", str(audit), "--public-key",
                      str(tmp_path / "state" / "audit-public.pem"),
                      "--sealed-state", str(tmp_path / "state")),
        env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 chains (one per worker): OK" in verify.stdout
    assert verify.stdout.count("audit log OK") == 2
    # A record changed in one worker's chain fails the whole log, naming that chain.
    last = chains(audit)[1][-1]
    lines = last.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"kind"', b'"kinD"', 1)
    last.write_bytes(b"".join(lines))
    tampered = subprocess.run(
        sealserve_cmd("audit", "verify", str(audit), "--public-key",
                      str(tmp_path / "state" / "audit-public.pem")),
        env=sealserve_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    assert "2 chains (one per worker): FAILED" in tampered.stdout
    assert f"first bad record: {last}:2:" in tampered.stdout
    # One sealed ledger per worker, read as one.
    state = tmp_path / "state"
    assert (state / "watermark-ledger-worker-1").is_file()
    assert (state / "watermark-ledger-worker-2").is_file()
    assert not (state / "watermark-ledger").exists()
    ledgers = [_open_ledger(sim_root, [state / f"watermark-ledger-worker-{k}"]) for k in (1, 2)]
    union = _open_ledger(sim_root, [state])
    assert len(union) == sum(len(led) for led in ledgers) > 0


def _scrape(port: int) -> dict[str, dict[str, float]]:
    """The parent's /metrics: sample name -> {worker: summed value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_worker = out.setdefault(sample.name, {})
            worker = sample.labels["worker"]
            by_worker[worker] = by_worker.get(worker, 0.0) + sample.value
    return out


def _open_ledger(sim_root: Path, paths: list[Path]) -> Any:
    import argparse

    from sealserve.cli.watermark import open_ledger

    args = argparse.Namespace(ledger=paths, platform="simulated", simulated_root=[sim_root])
    return open_ledger(args)


def test_a_dead_worker_stops_the_group_with_a_nonzero_exit(tmp_path: Path, sim_root: Path) -> None:
    cfg = _config(tmp_path, sim_root, defended=False, rest=False)
    proc, info = serve_until_ready(cfg, tmp_path / "ready.json")
    try:
        os.kill(info["workers"][0], signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert "worker 1" in out and "exited with code -9 while serving" in out
    assert not _alive(info["workers"][1])


def test_reserved_port_is_shared_only_with_reuseport_listeners() -> None:
    settings = Settings.load(None, port=0, unsafe_disable_auth=True)
    held = reserve_port(settings, "port", "127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        assert port != 0
        # A plain listener cannot take it; a gRPC server with so_reuseport can.
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        server = grpc.server(
            __import__("concurrent.futures").futures.ThreadPoolExecutor(1),
            options=[("grpc.so_reuseport", 1)],
        )
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.stop(0)
        with pytest.raises(ConfigError, match="port: cannot listen on 127.0.0.1:"):
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen(1)
                reserve_port(settings, "port", "127.0.0.1", taken.getsockname()[1])
    finally:
        held.close()


def test_the_fork_point_has_no_threads_and_no_onnxruntime() -> None:
    # What `sealserve serve` imports before it forks starts neither; either one refuses.
    code = (
        "import threading\n"
        "import sealserve.cli.serve, sealserve.server.workers as w\n"
        "w.check_single_threaded()\n"
        "def refused():\n"
        "    try:\n        w.check_single_threaded()\n"
        "    except RuntimeError as e:\n        print(e)\n"
        "import onnxruntime\n"
        "refused()\n"
        "threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()\n"
        "refused()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=sealserve_env(),
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.splitlines() == [
        "cannot fork workers: onnxruntime is already imported",
        "cannot fork workers: other threads are running (MainThread, Thread-1 (wait))",
    ], out.stdout + out.stderr


def test_a_worker_whose_runtime_differs_from_the_manifest_refuses(sim_root: Path) -> None:
    import dataclasses

    from sealserve import demo
    from sealserve.server.app import Server

    settings = Settings.load(
        None, port=0, unsafe_disable_auth=True, harden_process=False,
        model_repository=demo.repository(), attestation_platform="simulated",
        simulated_platform_dir=sim_root,
    )  # fmt: skip
    server = Server(settings)
    server.prepare(fork=True)
    server.worker = 1
    server._check_runtime()  # the same installation: the same record
    runtime = {**server.manifest.runtime, "foreign_modules": {"evil": "00" * 32}}
    server.manifest = dataclasses.replace(server.manifest, runtime=runtime)
    with pytest.raises(ConfigError, match="worker 1: the runtime record differs from the "
                       "attested manifest's in foreign_modules"):  # fmt: skip
        server._check_runtime()
