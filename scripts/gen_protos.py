#!/usr/bin/env python3
"""Regenerate sealserve/_proto from protos/*.proto.

Runs grpcio-tools' protoc (version pinned in pyproject's [dev] extra), then rewrites
the output in three ways so it works across protobuf runtimes 5.x-7.x and beside
tritonclient in one process:

1. messages are added to ``sealserve._proto.POOL`` instead of the default pool;
2. the protobuf runtime-version gate (absent before protobuf 5.26) is removed;
3. the gRPC modules import their messages package-relative and drop the grpcio
   version gate (they use only APIs present in every supported grpcio).

``--check DIR`` writes to DIR instead, for the test that fails when the committed
code is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "sealserve" / "_proto"


def _rewrite_pb2(text: str) -> str:
    text = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", text)
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
    text = text.replace(
        "_descriptor_pool.Default().AddSerializedFile(",
        "_POOL.AddSerializedFile(",
    )
    text = text.replace(
        "# @@protoc_insertion_point(imports)",
        "from sealserve._proto import POOL as _POOL\n# @@protoc_insertion_point(imports)",
    )
    # Imports of sibling generated modules become package-relative.
    text = re.sub(
        r"^import (\w+_pb2) as ", r"from sealserve._proto import \1 as ", text, flags=re.M
    )
    text = re.sub(r"# Protobuf Python Version: .*\n", "", text)
    return text


def _rewrite_grpc(text: str) -> str:
    text = re.sub(
        r"^import (\w+_pb2) as ", r"from sealserve._proto import \1 as ", text, flags=re.M
    )
    start = text.find("GRPC_GENERATED_VERSION")
    end = text.find("\n\n\nclass ")
    if start != -1 and end != -1:
        text = text[:start] + text[end + 1 :]
    text = text.replace("import warnings\n", "")
    text = re.sub(r",\s*_registered_method=True", "", text)
    text = re.sub(r"\n\s*server\.add_registered_method_handlers\([^)]*\)", "", text)
    return text


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTOS.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).iterdir()):
            text = src.read_text()
            if src.name.endswith("_pb2_grpc.py"):
                text = _rewrite_grpc(text)
            elif src.name.endswith("_pb2.py"):
                text = _rewrite_pb2(text)
            elif src.name.endswith(".pyi"):
                text = re.sub(
                    r"^import (\w+_pb2) as ",
                    r"from sealserve._proto import \1 as ",
                    text,
                    flags=re.M,
                )
            dest = out / src.name
            dest.write_text(text)
            written.append(dest)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
