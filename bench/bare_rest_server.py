#!/usr/bin/env python3
"""The REST baseline: a bare OIP infer endpoint (JSON in, JSON out, orjson, the model run
inline, no validation, no metrics, plaintext) on a choice of ASGI servers, as a bare
ASGI callable or as a Starlette route (the framework candidate).

Usage: python bench/bare_rest_server.py MODEL.onnx --server uvicorn|uvicorn-h11|hypercorn|granian
       [--framework bare|starlette] [--port P] --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

_DT = {"FP32": np.float32, "INT64": np.int64}
_OIP = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def _session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _infer(sess: ort.InferenceSession, body: bytes, model: str) -> bytes:
    doc = orjson.loads(body)
    feed = {
        t["name"]: np.asarray(t["data"], dtype=_DT[t["datatype"]]).reshape(t["shape"])
        for t in doc["inputs"]
    }
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feed)
    return orjson.dumps(
        {
            "model_name": model,
            "model_version": "1",
            "outputs": [
                {"name": n, "datatype": _OIP[a.dtype], "shape": list(a.shape),
                 "data": a.reshape(-1)}
                for n, a in zip(names, outs, strict=True)
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )  # fmt: skip


def bare_app(path: str) -> Any:
    sess = _session(path)
    headers = [(b"content-type", b"application/json")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        model = scope["path"].split("/")[3]
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        out = _infer(sess, b"".join(chunks), model)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(out)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": out})

    return app


def starlette_app(path: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    sess = _session(path)

    async def infer(request: Request) -> Response:
        out = _infer(sess, await request.body(), request.path_params["model"])
        return Response(out, media_type="application/json")

    return Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])


def _app() -> Any:
    # granian imports the app by name, in its worker: configured through the environment.
    model, framework = os.environ["BARE_REST_MODEL"], os.environ["BARE_REST_FRAMEWORK"]
    return starlette_app(model) if framework == "starlette" else bare_app(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--server", default="uvicorn",
                    choices=["uvicorn", "uvicorn-h11", "hypercorn", "granian"])  # fmt: skip
    ap.add_argument("--framework", default="bare", choices=["bare", "starlette"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path, required=True)
    args = ap.parse_args()
    port = args.port or _free_port()
    os.environ["BARE_REST_MODEL"], os.environ["BARE_REST_FRAMEWORK"] = args.model, args.framework

    def ready() -> None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        tmp.replace(args.ready_file)

    if args.server == "granian":
        from granian import Granian

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        server = Granian("bare_rest_server:_app", address="127.0.0.1", port=port,
                         interface="asgi", workers=1, factory=True, log_enabled=False)  # fmt: skip
        asyncio.get_event_loop_policy()  # nothing to wait for: granian binds in serve()
        ready()
        server.serve()
        return
    app = _app()
    if args.server == "hypercorn":
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.keep_alive_max_requests = 10**9  # the default 1000 closes mid-run

        async def run() -> None:
            task = asyncio.ensure_future(serve(app, config))
            await asyncio.sleep(0.5)
            ready()
            await task

        asyncio.run(run())
        return
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", access_log=False, log_config=None,
        http="httptools" if args.server == "uvicorn" else "h11", server_header=False,
    )  # fmt: skip
    server = uvicorn.Server(config)

    async def run_uvicorn() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        ready()
        await task

    asyncio.run(run_uvicorn())


if __name__ == "__main__":
    main()
