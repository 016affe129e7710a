"""Modules stay small (STYLE.md rule 5): one over 400 lines says why in its docstring,
in a line ``Over 400 lines: <reason>``."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

LIMIT = 400


def test_every_long_module_gives_its_reason() -> None:
    unexplained = []
    for path in sorted((ROOT / "sealserve").rglob("*.py")):
        if "_proto" in path.parts:
            continue  # generated
        text = path.read_text()
        if text.count("\n") <= LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "Over 400 lines: " not in doc:
            unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, "long modules without a reason: " + ", ".join(unexplained)
