#!/usr/bin/env python3
"""Check that the committed generated code loads and round-trips on protobuf 5.x, 6.x
and 7.x runtimes (tritonclient pins < 7; grpcio-tools' own runtime is newer).

Each runtime is installed with pip into a throw-away --target directory and used in a
subprocess; the project's environment is left alone.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("protobuf>=5.26,<6", "protobuf>=6,<7", "protobuf>=7,<8")
PROBE = """
import google.protobuf, sys
from sealserve._proto import grpc_service_pb2 as pb, attestation_pb2 as apb
r = pb.ModelInferRequest(model_name="m")
r.inputs.add(name="x", datatype="FP32", shape=[1, 2]).parameters["k"].int64_param = 3
r.raw_input_contents.append(b"\\0" * 8)
assert pb.ModelInferRequest.FromString(r.SerializeToString()) == r
assert apb.GetEvidenceRequest(nonce=b"n" * 32).nonce == b"n" * 32
print(google.protobuf.__version__)
"""


def main() -> int:
    failed = 0
    for spec in RUNTIMES:
        with tempfile.TemporaryDirectory() as target:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--target",
                    target,
                    spec,
                ],
                check=True,
            )
            env = {"PYTHONPATH": f"{target}:{ROOT}", "PATH": "/usr/bin:/bin"}
            out = subprocess.run(
                [sys.executable, "-S", "-c", PROBE], env=env, capture_output=True, text=True
            )
            if out.returncode == 0:
                print(f"ok   {spec:22} -> protobuf {out.stdout.strip()}")
            else:
                failed += 1
                print(f"FAIL {spec:22}\n{out.stderr}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
