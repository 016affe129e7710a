#!/usr/bin/env python3
"""The baseline: a bare, minimal grpc.aio OIP server (ModelInfer only, raw contents,
``InferenceSession.run`` inline, no validation, no metrics, plaintext).

Usage: python bench/bare_server.py MODEL.onnx --port PORT [--ready-file F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sealserve._proto import grpc_service_pb2 as pb

_DT = {"FP32": np.float32, "INT64": np.int64}
_OIP = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def build(path: str) -> grpc.GenericRpcHandler:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

    async def model_infer(
        req: pb.ModelInferRequest, ctx: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:  # type: ignore[type-arg]
        feed = {
            t.name: np.frombuffer(raw, dtype=_DT[t.datatype]).reshape(tuple(t.shape))
            for t, raw in zip(req.inputs, req.raw_input_contents, strict=True)
        }
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feed)
        resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
        for name, arr in zip(names, outs, strict=True):
            resp.outputs.add(name=name, datatype=_OIP[arr.dtype], shape=arr.shape)
            resp.raw_output_contents.append(arr.tobytes())
        return resp

    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                model_infer,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString,
            )
        },
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path)
    args = ap.parse_args()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((build(args.model),))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
