"""Run by test_kserve_client.py in its own interpreter: KServe's package registers the
OIP protobuf messages under the names tritonclient and sealserve use, so it cannot be
imported into the test process. Reads a JSON job on stdin, prints JSON results."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(job: dict[str, Any]) -> dict[str, Any]:
    verify: Any = False
    if job.get("cadata"):
        verify = ssl.create_default_context(cadata=job["cadata"])
    elif job.get("system_roots"):
        verify = ssl.create_default_context()
    client = InferenceRESTClient(RESTConfig(protocol="v2", verify=verify, timeout=30, retries=0))
    base, h = job["base"], {"Authorization": f"Bearer {job['token']}"}
    out: dict[str, Any] = {}
    try:
        try:
            out["live"] = await client.is_server_live(base, headers=h)
        except httpx.ConnectError as exc:
            return {"connect_error": type(exc).__name__}
        out["ready"] = await client.is_server_ready(base, headers=h)
        out["model_ready"] = await client.is_model_ready(base, "digits", headers=h)
        x = np.asarray(job["x"], dtype=np.float32)
        for binary in (False, True):
            t = InferInput("input", list(x.shape), "FP32")
            t.set_data_from_numpy(x, binary_data=binary)
            req = InferRequest(model_name="digits", infer_inputs=[t], request_id=f"r-{binary}")
            res = await client.infer(base, req, model_name="digits", headers=dict(h))
            out[f"infer_{binary}"] = {
                "id": res.id,
                "model_name": res.model_name,
                **{o.name: o.as_numpy().tolist() for o in res.outputs},
            }
        errors: list[list[Any] | None] = []
        for model, shape, headers in job.get("errors", []):
            t = InferInput("input", shape, "FP32")
            t.set_data_from_numpy(np.zeros(shape, np.float32), binary_data=False)
            try:
                await client.infer(base, InferRequest(model, [t]), model_name=model,
                                   headers=headers)  # fmt: skip
                errors.append(None)
            except httpx.HTTPStatusError as exc:
                errors.append([exc.response.status_code, exc.response.text])
        out["errors"] = errors
    finally:
        await client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.load(sys.stdin)))))
