"""Servicers stay thin: an RPC method converts, calls the core, converts back, and
leaves every error to the one adapter (sealserve/rpc/status.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SERVICER_FILES = [
    *sorted((ROOT / "sealserve/server/grpc").glob("*.py")),
    ROOT / "sealserve/broker/service.py",
]
MAX_LINES = 10


def _rpc_methods(path: Path) -> list[tuple[str, ast.AsyncFunctionDef, list[str]]]:
    """(Class.Method, node, source lines) of every CamelCase async method: an RPC."""
    lines = path.read_text().splitlines()
    found = []
    for cls in ast.walk(ast.parse(path.read_text())):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if isinstance(node, ast.AsyncFunctionDef) and node.name[:1].isupper():
                found.append((f"{cls.name}.{node.name}", node, lines))
    return found


def _body_lines(node: ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Code lines of the body: no blank lines, comments or docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body:
        return 0
    text = lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


METHODS = [m for path in SERVICER_FILES for m in _rpc_methods(path)]


def test_the_servicer_files_hold_rpc_methods() -> None:
    names = {name for name, _, _ in METHODS}
    assert {"InferenceServicer.ModelInfer", "KeyBrokerServicer.AddKey",
            "AdminServicer.SetStatus"} <= names  # fmt: skip


@pytest.mark.parametrize("name,node,lines", METHODS, ids=[m[0] for m in METHODS])
def test_servicer_methods_are_short_and_leave_errors_to_the_adapter(
    name: str, node: ast.AsyncFunctionDef, lines: list[str]
) -> None:
    assert _body_lines(node, lines) <= MAX_LINES, f"{name} is longer than {MAX_LINES} lines"
    decorators = {ast.unparse(d) for d in node.decorator_list}
    assert "grpc_errors" in decorators, f"{name} is not wrapped by rpc.status.grpc_errors"
    for inner in ast.walk(node):
        if isinstance(inner, ast.Call) and "abort" in ast.unparse(inner.func):
            pytest.fail(f"{name} aborts by hand: {ast.unparse(inner)[:60]}")
