"""Small ONNX models built in code for the server tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

DTYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(model: onnx.ModelProto, repo: Path, name: str, version: int = 1) -> Path:
    onnx.checker.check_model(model)
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def identity_all_types(repo: Path, name: str = "identity", skip: tuple[str, ...] = ()) -> None:
    """'identity': one Identity per OIP datatype, inputs in_<DT> -> outputs out_<DT>."""
    nodes, ins, outs = [], [], []
    for dt, tp in DTYPES.items():
        if dt in skip:
            continue
        ins.append(helper.make_tensor_value_info(f"in_{dt}", tp, [None, 3]))
        outs.append(helper.make_tensor_value_info(f"out_{dt}", tp, [None, 3]))
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
    graph = helper.make_graph(nodes, name, ins, outs)
    _save(helper.make_model(graph, opset_imports=OPSET), repo, name)


def matmul(repo: Path, *, name: str = "matmul", n_in: int = 64, n_out: int = 32,
           seed: int = 0, versions: tuple[int, ...] = (1,)) -> np.ndarray:  # fmt: skip
    """y = relu(x @ W): x FP32 [-1, n_in]. Returns W (float32)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    for v in versions:
        graph = helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "W"], ["h"]),
                helper.make_node("Relu", ["h"], ["y"]),
            ],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_in])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n_out])],
            initializer=[numpy_helper.from_array(w * v, "W")],
        )
        _save(helper.make_model(graph, opset_imports=OPSET), repo, name, v)
    return w


def two_inputs(repo: Path) -> None:
    """'add': a FP32 [-1, 4] + b FP32 [-1, 4] -> sum."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 4]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 4])],
    )
    _save(helper.make_model(graph, opset_imports=OPSET), repo, "add")


def failing_reshape(repo: Path) -> None:
    """'reshape3': reshapes x FP32 [-1, -1] to [-1, 3]; fails at run time unless the
    element count divides by 3 (an onnxruntime failure the client can trigger)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape")],
    )
    _save(helper.make_model(graph, opset_imports=OPSET), repo, "reshape3")
