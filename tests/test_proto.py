"""The committed generated code is current, loads into a private pool, and coexists
with tritonclient in one process while staying wire-compatible."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "sealserve" / "_proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    have = {
        p.name: p.read_text()
        for p in committed.iterdir()
        if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py"
    }
    assert sorted(fresh) == sorted(have), "generated file set differs: run scripts/gen_protos.py"
    for name, text in fresh.items():
        assert have[name] == text, f"{name} is stale: run scripts/gen_protos.py"


def test_messages_live_in_private_pool() -> None:
    from sealserve._proto import POOL
    from sealserve._proto import grpc_service_pb2 as pb

    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is POOL
    # In a fresh process, importing sealserve's messages leaves the default pool empty
    # of them (so tritonclient can register its own 'inference.*' types later).
    code = (
        "from google.protobuf import descriptor_pool\n"
        "import sealserve._proto.grpc_service_pb2, sealserve._proto.admin_pb2\n"
        "try:\n"
        "    descriptor_pool.Default().FindMessageTypeByName('inference.ModelInferRequest')\n"
        "    print('registered')\n"
        "except KeyError:\n"
        "    print('private')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "private"


def test_side_by_side_with_tritonclient_and_wire_compatible() -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient not installed (it is part of the [dev] extra)")
    code = """
import tritonclient.grpc
from tritonclient.grpc import service_pb2 as tpb
import sealserve
from sealserve._proto import grpc_service_pb2 as pb
req = pb.ModelInferRequest(model_name="m", model_version="1", id="r1")
t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
req.raw_input_contents.append(b"\\x00" * 8)
theirs = tpb.ModelInferRequest.FromString(req.SerializeToString())
assert theirs.model_name == "m" and list(theirs.inputs[0].shape) == [1, 2]
back = pb.ModelInferRequest.FromString(theirs.SerializeToString())
assert back == req
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
