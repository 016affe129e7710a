#!/usr/bin/env python3
"""REST benchmark: the candidates for the REST port, and sealserve's REST port next to
its gRPC port and a bare ASGI OIP endpoint, in one run.

Part 1 (the choice): one bare OIP infer endpoint (bench/bare_rest_server.py: JSON in
and out, orjson, the digits model run inline) served by each candidate ASGI server
(uvicorn with httptools, uvicorn with h11, hypercorn, granian) and as a Starlette route
on uvicorn (the framework candidate). Part 2 (the target): `sealserve serve` with the
REST port on (no auth, no defense, plaintext like the baselines): JSON and binary
requests over REST, the same request over gRPC, and the bare endpoint on uvicorn.

Closed loop on loopback, batch-1 digits requests, keep-alive connections; server CPU
per request from /proc (the server's whole process tree: granian runs workers).

    python bench/bench_rest.py [--seconds 4] [--rounds 2]
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._results import write_section  # noqa: E402
from bench.bench_serving import load as grpc_load  # noqa: E402
from bench.bench_serving import request_bytes, start  # noqa: E402
from sealserve import demo  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rps: float
    p50_ms: float
    cpu_us: float


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (live ones)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return head.encode() + b"\r\n" + body


async def http_load(port: int, payload: bytes, *, concurrency: int, seconds: float) -> list[float]:
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        for _ in range(200):  # the server may still be binding (granian)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise SystemExit(f"cannot connect to 127.0.0.1:{port}")
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"bad response: {head[:200]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat


def measure(pid: int, run: object, seconds: float) -> Result:
    asyncio.run(run(0.5))  # type: ignore[operator]  # warm-up
    cpu0, t0 = tree_cpu_s(pid), time.perf_counter()
    lat = asyncio.run(run(seconds))  # type: ignore[operator]
    wall, cpu = time.perf_counter() - t0, tree_cpu_s(pid) - cpu0
    lat.sort()
    return Result(len(lat) / wall, lat[len(lat) // 2] * 1e3, cpu / len(lat) * 1e6)


def mean(results: list[Result]) -> Result:
    return Result(*(statistics.fmean(getattr(r, f) for r in results)
                    for f in ("rps", "p50_ms", "cpu_us")))  # fmt: skip


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds, averaged")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealserve-bench-rest-"))
    repo = tmp / "models"
    shutil.copytree(demo.repository() / "digits", repo / "digits")
    model = str(repo / "digits" / "1" / "model.onnx")
    cfg = tmp / "sealserve.toml"
    cfg.write_text(
        f'model_repository = "{repo}"\nport = 0\nworkers = 1\nunsafe_plaintext = true\n'
        'log_format = "text"\nlog_level = "warning"\nunsafe_disable_auth = true\n'
        "harden_process = false\n[rest]\nport = 0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    x = np.asarray(demo.holdout()[0][:1], dtype=np.float32)
    json_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                        "data": x.reshape(-1).tolist()}]}).encode()  # fmt: skip
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    json_req = http_request("/v2/models/digits/infer", json_body)
    binary_req = http_request(
        "/v2/models/digits/infer", head + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(head))},
    )  # fmt: skip
    grpc_payload = request_bytes("digits", "input", x)

    candidates = [("uvicorn", "bare"), ("uvicorn", "starlette"), ("uvicorn-h11", "bare")]
    if available("hypercorn"):
        candidates.append(("hypercorn", "bare"))
    if available("granian"):
        candidates.append(("granian", "bare"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[str] = []
    verdicts: list[str] = []
    try:
        servers: dict[str, tuple[int, int]] = {}
        for server, framework in candidates:
            ready = tmp / f"bare-{server}-{framework}.json"
            p = start([sys.executable, str(ROOT / "bench" / "bare_rest_server.py"), model,
                       "--server", server, "--framework", framework, "--ready-file", str(ready)],
                      ready, env)  # fmt: skip
            procs.append(p)
            servers[f"{framework} ASGI on {server}"] = (
                p.pid,
                json.loads(ready.read_text())["port"],
            )
        ready = tmp / "sealserve.json"
        p = start([sys.executable, "-m", "sealserve", "serve", "--config", str(cfg),
                   "--ready-file", str(ready)], ready, env)  # fmt: skip
        procs.append(p)
        info = json.loads(ready.read_text())
        seal_pid, seal_grpc, seal_rest = p.pid, info["port"], info["rest_port"]
        baseline = "bare ASGI on uvicorn"
        for c in (1, 16):
            systems: dict[str, tuple[int, object]] = {}
            for name, (pid, port) in servers.items():
                systems[name] = (pid, lambda s, port=port, c=c: http_load(
                    port, json_req, concurrency=c, seconds=s))  # fmt: skip
            systems["sealserve REST (JSON)"] = (seal_pid, lambda s, c=c: http_load(
                seal_rest, json_req, concurrency=c, seconds=s))  # fmt: skip
            systems["sealserve REST (binary)"] = (seal_pid, lambda s, c=c: http_load(
                seal_rest, binary_req, concurrency=c, seconds=s))  # fmt: skip
            systems["sealserve gRPC"] = (seal_pid, lambda s, c=c: grpc_load(
                f"127.0.0.1:{seal_grpc}", grpc_payload, concurrency=c, seconds=s))  # fmt: skip
            got: dict[str, list[Result]] = {name: [] for name in systems}
            for _ in range(args.rounds):
                for name, (pid, run) in systems.items():
                    try:
                        got[name].append(measure(pid, run, args.seconds))
                    except (OSError, asyncio.IncompleteReadError) as exc:
                        raise SystemExit(f"{name}: {exc!r}") from exc
            base = mean(got[baseline])
            for name in systems:
                r = mean(got[name])
                rows.append(
                    f"| {c} | {name} | {r.rps:,.0f} ({r.rps / base.rps:.2f}x) "
                    f"| {r.p50_ms:.3f} ({r.p50_ms / base.p50_ms:.2f}x) "
                    f"| {r.cpu_us:,.0f} ({r.cpu_us / base.cpu_us:.2f}x) |"
                )
                print(rows[-1], flush=True)
            if c == 16:
                s = mean(got["sealserve REST (JSON)"])
                ratio = s.cpu_us / base.cpu_us
                verdicts.append(
                    f"- sealserve REST CPU per request, undefended, c=16: {ratio:.2f}x the bare "
                    f"ASGI endpoint on uvicorn (target <= 1.3x): "
                    f"**{'met' if ratio <= 1.3 else 'NOT met'}**"
                )
                g = mean(got["sealserve gRPC"])
                verdicts.append(
                    f"- sealserve REST (JSON) vs sealserve gRPC, CPU per request at c=16: "
                    f"{s.cpu_us / g.cpu_us:.2f}x; throughput {s.rps / g.rps:.2f}x"
                )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    table = (
        "| concurrency | system | req/s | p50 ms | server CPU µs/req |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    body = (
        "Batch-1 FP32 digits requests (64 floats; JSON unless marked binary), closed loop on "
        "loopback over keep-alive connections, on the 2-core dev machine (the load generator "
        "shares the cores). Ratios are to the bare ASGI OIP endpoint on uvicorn+httptools "
        "(bench/bare_rest_server.py). `sealserve` runs plaintext, without auth or defenses, "
        "like the baselines; its gRPC row is the same server's gRPC port. Server CPU is the "
        "server's process tree (granian runs its app in a worker process). "
        f"{args.rounds} alternating rounds of {args.seconds:g} s each, averaged.\n\n"
        + table
        + "\n\nTargets:\n"
        + "\n".join(verdicts)
    )
    print(body)
    if not args.no_write:
        command = " ".join(["python bench/bench_rest.py", *sys.argv[1:]])
        write_section("REST", command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
