#!/usr/bin/env python3
"""Serving benchmark: raw onnxruntime vs a bare grpc.aio OIP server vs `sealserve serve`.

Side by side in one run, on loopback, with the same closed-loop load generator and the
same batch-1 FP32 requests to the same model: (a) raw ``InferenceSession.run`` in
process (the floor), (b) bench/bare_server.py (the baseline), (c) ``sealserve serve``
(no defense enabled; plaintext like the baseline, so transport costs match). Two
models: the demo digits classifier (tiny: transport dominates) and a heavier MLP
(a few ms per batch-1 run) where dynamic batching matters.

Reports requests/s, p50/p99 latency and server CPU-µs per request at concurrency 1
and 16, as ratios to (b), and writes the table to bench/RESULTS.md.

    python bench/bench_serving.py [--seconds 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._results import write_section  # noqa: E402
from sealserve import demo  # noqa: E402
from sealserve._proto import grpc_service_pb2 as pb  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float


def heavy_model(path: Path, *, d_in: int = 256, hidden: int = 4096) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ws = [
        (rng.standard_normal((d_in, hidden)) * 0.05).astype(np.float32),
        (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float32),
        (rng.standard_normal((hidden, 10)) * 0.02).astype(np.float32),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        initializer=[numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(ws)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def request_bytes(model: str, name: str, x: np.ndarray) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


async def load(target: str, payload: bytes, *, concurrency: int, seconds: float,
               metadata: tuple[tuple[str, str], ...] = ()) -> list[float]:  # fmt: skip
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(concurrency, 4))]
    calls = [ch.unary_unary(METHOD) for ch in channels]
    for call in calls:  # warm the connections
        await call(payload, metadata=metadata)
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        call = calls[k % len(calls)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await call(payload, metadata=metadata)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    for ch in channels:
        await ch.close()
    return lat


def measure_server(pid: int, target: str, payload: bytes, c: int, seconds: float,
                   metadata: tuple[tuple[str, str], ...] = ()) -> Result:  # fmt: skip
    asyncio.run(load(target, payload, concurrency=c, seconds=0.5, metadata=metadata))  # warm-up
    cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
    lat = asyncio.run(load(target, payload, concurrency=c, seconds=seconds, metadata=metadata))
    wall, cpu = time.perf_counter() - t0, proc_cpu_s(pid) - cpu0
    lat.sort()
    return Result(
        rps=len(lat) / wall,
        p50_ms=lat[len(lat) // 2] * 1e3,
        p99_ms=lat[int(len(lat) * 0.99)] * 1e3,
        cpu_us=cpu / len(lat) * 1e6,
    )


def measure_raw(model: Path, name: str, x: np.ndarray, c: int, seconds: float) -> Result:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model), sess_options=opts)
    sess.run(None, {name: x})
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    cpu0, t0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat.sort()
    return Result(len(lat) / wall, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3,
                  cpu / len(lat) * 1e6)  # fmt: skip


def start(
    cmd: list[str], ready: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"server failed to start: {' '.join(cmd)}\n{err}")
        time.sleep(0.05)
    return proc


def mean(results: list[Result]) -> Result:
    return Result(*(statistics.fmean(getattr(r, f) for r in results)
                    for f in ("rps", "p50_ms", "p99_ms", "cpu_us")))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds, averaged")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealserve-bench-"))
    repo = tmp / "models"
    shutil.copytree(demo.repository() / "digits", repo / "digits")
    heavy_model(repo / "heavy" / "1" / "model.onnx")
    (repo / "heavy" / "config.toml").write_text(
        '[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 500\nexecution = "thread"\n'
    )
    cfg = tmp / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{repo}"\nport = 0\nworkers = 1\nunsafe_plaintext = true\n'
        'log_format = "text"\nlog_level = "warning"\nunsafe_disable_auth = true\n'
    )
    # The same server with authentication on: an ES256 token per request.
    from sealserve.auth import TokenIssuer, generate_keypair

    pem, jwks = generate_keypair("ES256")
    (tmp / "jwks.json").write_text(json.dumps(jwks))
    cfg_auth = tmp / "sealserve-auth.toml"
    cfg_auth.write_text(
        f'model_repository = "{repo}"\nport = 0\nworkers = 1\nunsafe_plaintext = true\n'
        'log_format = "text"\nlog_level = "warning"\n'
        '[auth]\naudience = "bench"\nrequired_tos_version = "1"\n'
        f'[[auth.issuers]]\nissuer = "https://bench.invalid"\njwks_file = "{tmp / "jwks.json"}"\n'
    )
    token = TokenIssuer.from_pem(pem, issuer="https://bench.invalid", audience="bench").issue(
        "bench", tier="standard", scopes=["infer"], tos_version="1", ttl=3600
    )
    auth_md = (("authorization", f"Bearer {token}"),)
    # ... and with quotas on too (SQLite state store; limits far above the load).
    cfg_quota = tmp / "sealserve-quota.toml"
    cfg_quota.write_text(
        cfg_auth.read_text().replace(
            "[auth]", f'state_store = "sqlite://{tmp / "state.db"}"\n[auth]'
        )
        + "[limits.tiers.standard]\nrate = 1000000\nburst = 1000000\nper_day = 1000000000\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    models = {
        "digits (tiny)": ("digits", "input", np.asarray(demo.holdout()[0][:1])),
        "heavy MLP": (
            "heavy",
            "x",
            np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32),
        ),
    }
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[str] = []
    verdicts: list[str] = []
    try:
        servers = {}
        for model_name, (mname, _, _) in models.items():
            ready = tmp / f"bare-{mname}.json"
            p = start([sys.executable, str(ROOT / "bench" / "bare_server.py"),
                       str(repo / mname / "1" / "model.onnx"), "--ready-file", str(ready)], ready, env)  # fmt: skip
            procs.append(p)
            servers[(model_name, "bare")] = (p.pid, json.loads(ready.read_text())["port"])
        ready = tmp / "sealserve.json"
        p = start([sys.executable, "-m", "sealserve", "serve", "--config", str(cfg),
                   "--ready-file", str(ready)], ready, env)  # fmt: skip
        procs.append(p)
        seal = (p.pid, json.loads(ready.read_text())["port"])
        ready = tmp / "sealserve-auth.json"
        p = start([sys.executable, "-m", "sealserve", "serve", "--config", str(cfg_auth),
                   "--ready-file", str(ready)], ready, env)  # fmt: skip
        procs.append(p)
        seal_auth = (p.pid, json.loads(ready.read_text())["port"])
        ready = tmp / "sealserve-quota.json"
        p = start([sys.executable, "-m", "sealserve", "serve", "--config", str(cfg_quota),
                   "--ready-file", str(ready)], ready, env)  # fmt: skip
        procs.append(p)
        seal_quota = (p.pid, json.loads(ready.read_text())["port"])
        for model_name, (mname, iname, x) in models.items():
            payload = request_bytes(mname, iname, x)
            for c in (1, 16):
                # Every system, measured in alternating rounds.
                systems: dict[str, tuple[int, int, tuple[tuple[str, str], ...]]] = {
                    "bare": (*servers[(model_name, "bare")], ()),
                    "sealserve": (*seal, ()),
                    "sealserve+auth": (*seal_auth, auth_md),
                    "sealserve+auth+quota": (*seal_quota, auth_md),
                }
                got: dict[str, list[Result]] = {name: [] for name in ("raw", *systems)}
                for _ in range(args.rounds):
                    got["raw"].append(
                        measure_raw(
                            repo / mname / "1" / "model.onnx", iname, x, c, args.seconds / 2
                        )
                    )
                    for name, (pid, port, md) in systems.items():
                        got[name].append(
                            measure_server(pid, f"127.0.0.1:{port}", payload, c, args.seconds, md)
                        )
                base = mean(got["bare"])
                for system in got:
                    r = mean(got[system])
                    rows.append(
                        f"| {model_name} | {c} | {system} | {r.rps:,.0f} ({r.rps / base.rps:.2f}x) "
                        f"| {r.p50_ms:.3f} ({r.p50_ms / base.p50_ms:.2f}x) "
                        f"| {r.p99_ms:.3f} ({r.p99_ms / base.p99_ms:.2f}x) "
                        f"| {r.cpu_us:,.0f} ({r.cpu_us / base.cpu_us:.2f}x) |"
                    )
                    print(rows[-1], flush=True)
                s = mean(got["sealserve"])
                if mname == "digits" and c == 16:
                    ratio = s.cpu_us / base.cpu_us
                    verdicts.append(f"- Server CPU per request, tiny model, saturated (c=16): "
                                    f"{ratio:.2f}x the bare server (target <= 1.10x): "
                                    f"**{'met' if ratio <= 1.10 else 'NOT met'}**")  # fmt: skip
                if mname == "digits" and c == 16:
                    a = mean(got["sealserve+auth"])
                    verdicts.append(f"- Authentication (ES256 bearer token, warm cache) adds "
                                    f"{a.cpu_us - s.cpu_us:,.0f} µs server CPU per request at c=16 "
                                    f"(target <= 40 µs): **{'met' if a.cpu_us - s.cpu_us <= 40 else 'NOT met'}**")  # fmt: skip
                if mname == "digits" and c == 16:
                    q = mean(got["sealserve+auth+quota"])
                    verdicts.append(f"- Quota admission (SQLite store, 3 limits) adds "
                                    f"{q.cpu_us - a.cpu_us:,.0f} µs server CPU per request at c=16 "
                                    f"(target <= 60 µs): **{'met' if q.cpu_us - a.cpu_us <= 60 else 'NOT met'}**")  # fmt: skip
                if mname == "digits" and c == 1:
                    ratio = s.p50_ms / base.p50_ms
                    verdicts.append(f"- c=1 p50 latency, tiny model: {ratio:.2f}x the bare server "
                                    f"(target <= 1.10x): **{'met' if ratio <= 1.10 else 'NOT met'}**")  # fmt: skip
                if mname == "heavy" and c == 16:
                    ratio = s.rps / base.rps
                    verdicts.append(f"- Throughput, heavy model, c=16 (dynamic batching): {ratio:.2f}x "
                                    f"the bare server (target >= 2x): **{'met' if ratio >= 2 else 'NOT met'}**")  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)
    table = (
        "| model | concurrency | system | req/s | p50 ms | p99 ms | server CPU µs/req |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    body = (
        "Batch-1 FP32 requests, closed loop on loopback; ratios are to the bare grpc.aio "
        "server (b). `raw` is `InferenceSession.run` in process (its CPU column is the "
        "whole process, load loop included). `sealserve` runs with no defense and no "
        "authentication, plaintext like the baseline; `sealserve+auth` is the same server "
        "verifying an ES256 bearer token on every request; `sealserve+auth+quota` adds "
        "quota admission against the embedded SQLite store. "
        f"{args.rounds} alternating rounds of "
        f"{args.seconds:g} s each, averaged.\n\n" + table + "\n\nTargets:\n" + "\n".join(verdicts)
    )
    print(body)
    if not args.no_write:
        write_section("Serving", "python bench/bench_serving.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
