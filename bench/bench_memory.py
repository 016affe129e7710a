#!/usr/bin/env python3
"""Resident memory of the demo deployment with and without process hardening.

    python bench/bench_memory.py [--requests 300]

Starts `sealserve serve` as a subprocess three times with the same config (the demo's
digits model, authentication, quotas on SQLite, the standard defense profile with
watermark, detection and the signed audit log, a simulated platform): without
hardening, with hardening (``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``), and,
for reference, with the eager lock it replaced (``MCL_ONFAULT`` masked out). Each server
answers the same batch-1 requests, then its VmRSS, VmHWM and VmLck are read from
/proc. Target: resident memory with hardening <= 1.2x without.

The hardened servers need the right to lock memory (root or CAP_IPC_LOCK, or an
unlimited RLIMIT_MEMLOCK); otherwise the step is skipped and the bench says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sealserve import demo  # noqa: E402
from sealserve._proto import grpc_service_pb2 as pb  # noqa: E402
from sealserve.auth import TokenIssuer, generate_keypair  # noqa: E402
from sealserve.enclave.simulated import SimulatedPlatform  # noqa: E402

ISS, AUD, TOS = "https://issuer.bench.invalid", "sealserve-bench", "2026-11"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
EAGER = (
    "import sys, sealserve.enclave.hardening as h; h.MCL_ONFAULT = 0; "
    "from sealserve.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
DEFENSE = """
[limits.tiers.standard]
rate = 100000
burst = 100000
per_day = 100000000
cost = "batch"

[defense]
state_dir = "state"
[defense.audit]
dir = "audit"
[defense.profiles.standard]
noise = { dist = "laplace", scale = 0.02 }
renormalise = true
preserve_top1 = true
round = 3
coarsen = { input_scale = 16 }
watermark = { fraction = 0.01 }
[defense.models.digits]
output = "probabilities"
label = "label"
profile = "standard"
reference = "REFERENCE"
"""


def write_config(tmp: Path, *, harden: bool) -> Path:
    cfg = tmp / f"sealserve-{harden}.toml"
    cfg.write_text(
        'model_repository = "models"\nport = 0\nworkers = 1\nunsafe_plaintext = true\n'
        'log_format = "text"\nlog_level = "warning"\n'
        'attestation_platform = "simulated"\nsimulated_platform_dir = "platform"\n'
        f'state_store = "sqlite://state-{harden}.db"\n'
        f"harden_process = {str(harden).lower()}\n"
        f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
        f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n'
        + DEFENSE.replace("REFERENCE", str(demo.reference_path()))
        .replace('state_dir = "state"', f'state_dir = "state-{harden}"')
        .replace('dir = "audit"', f'dir = "audit-{harden}"')
    )
    return cfg


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmLck", "VmSize"):
            out[key] = int(value.split()[0])
    return out


def run_one(tmp: Path, label: str, cmd: list[str], token: str, n: int) -> dict[str, int]:
    ready = tmp / f"ready-{label}.json"
    log = (tmp / f"{label}.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*cmd, "--ready-file", str(ready)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label}: server failed:\n{(tmp / f'{label}.log').read_text()}")
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        x, _ = demo.holdout()
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(METHOD)
            for i in range(n):  # rows that vary, so detectors and the ledger see traffic
                row = np.asarray(x[i % len(x) : i % len(x) + 1], dtype=np.float32)
                req = pb.ModelInferRequest(model_name="digits")
                req.inputs.add(name="input", datatype="FP32", shape=row.shape)
                req.raw_input_contents.append(row.tobytes())
                call(req.SerializeToString(), metadata=md)
        time.sleep(0.5)
        mem = status_kb(proc.pid)
        return mem
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per server")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sealserve-bench-mem-"))
    try:
        shutil.copytree(demo.repository(), tmp / "models")
        SimulatedPlatform.create_root(tmp / "platform")
        pem, jwks = generate_keypair("ES256")
        (tmp / "jwks.json").write_text(json.dumps(jwks))
        token = TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD).issue(
            "bench", tier="standard", scopes=["infer"], tos_version=TOS, ttl=3600
        )
        serve = ["serve", "--config"]
        runs = {
            "not hardened": [sys.executable, "-m", "sealserve", *serve,
                             str(write_config(tmp, harden=False))],
            "hardened (MCL_ONFAULT)": [sys.executable, "-m", "sealserve", *serve,
                                       str(write_config(tmp, harden=True))],
            "hardened, eager lock (before)": [sys.executable, "-c", EAGER, *serve,
                                              str(write_config(tmp, harden=True))],
        }  # fmt: skip
        got = {label: run_one(tmp, label.split()[0] + str(i), cmd, token, args.requests)
               for i, (label, cmd) in enumerate(runs.items())}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = got["not hardened"]
    rows = []
    for label, r in got.items():
        ratio = r["VmRSS"] / base["VmRSS"]
        rows.append(
            f"| {label} | {r['VmRSS'] / 1024:,.0f} ({ratio:.2f}x) | {r['VmHWM'] / 1024:,.0f} "
            f"| {r['VmLck'] / 1024:,.0f} |"
        )
    ratio = got["hardened (MCL_ONFAULT)"]["VmRSS"] / base["VmRSS"]
    applied = got["hardened (MCL_ONFAULT)"]["VmLck"] > 0  # nothing is locked when skipped
    print(
        f"`sealserve serve` subprocesses, demo digits model with auth, SQLite quotas and the "
        f"standard defense profile, after {args.requests} batch-1 requests each. VmLck is "
        "the size of the locked mappings (with MCL_ONFAULT only their touched pages are "
        "resident).\n\n"
        "| server | VmRSS MiB | VmHWM MiB | VmLck MiB |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Target: resident memory with hardening <= 1.2x without: {ratio:.2f}x, "
        + (
            f"**{'met' if ratio <= 1.2 else 'NOT met'}**"
            if applied
            else "**not measured** (memory locking was not permitted here)"
        )
        + f"\n\n(kernel {os.uname().release}, {os.cpu_count()} CPUs shared with other work; "
        f"load average at the end: {os.getloadavg()[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
