"""Error types and messages the docs quote exist in the code.

The convention the docs follow (and this test reads):

- every backticked ``FooError`` names a class of ``sealserve.errors`` (or a Python
  built-in exception);
- a message the client or operator sees is quoted in backticks either in a table whose
  header has a column named ``message`` (or ``error:`` line), or right after its type:
  ``SuspendedError`` (``account is suspended``). Alternatives in one cell are separated
  by `` / ``.
- Inside a message, ``...``, ``<name>``, quoted example values (``'free'``), numbers and
  all-capital placeholders (``FILE``, ``KEY``, ``N``) stand for what varies; every
  other run of words must appear in a string literal under ``sealserve/`` (adjacent
  literals joined, f-string fields counted as placeholders).
"""

from __future__ import annotations

import builtins
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

import sealserve.errors
from tests.conftest import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
ERROR_NAME = re.compile(r"`([A-Z]\w*Error)`")
INLINE = re.compile(r"`([A-Z]\w*Error)` \((?:`[A-Z_]+`: )?`([^`]+)`")
PLACEHOLDER = re.compile(
    r"\.\.\.|…|<[^>]*>|'[^']*'|\"[^\"]*\"|\b\d+(?:\.\d+)?\b|\b[A-Z][A-Z_:]*\b(?![a-z])"
)
CODE_FIELD = re.compile(r"\{[^{}]*\}")


def _literal(token: str, fields: list[str]) -> str:
    """A string token's text, f-string fields replaced by a NUL placeholder (string
    literals inside a field go to ``fields``)."""
    prefix = re.match(r"[A-Za-z]*", token).group(0)  # type: ignore[union-attr]
    body = token[len(prefix) :]
    quote = body[:3] if body[:3] in ('"""', "'''") else body[0]
    text = body[len(quote) : -len(quote)]
    if "f" in prefix.lower():
        for field in CODE_FIELD.findall(text):
            fields += [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", field)]
        text = CODE_FIELD.sub("\0", text)
    if "r" not in prefix.lower():
        text = text.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')
    return text


@cache
def code_literals() -> str:
    """Every string literal under sealserve/ (adjacent ones joined), NUL-separated."""
    out: list[str] = []
    for path in sorted((ROOT / "sealserve").rglob("*.py")):
        if "_proto" in path.parts:
            continue
        run: list[str] = []
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        for tok in tokens:
            if tok.type == tokenize.STRING:
                run.append(_literal(tok.string, out))
            elif tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
                continue
            else:
                if run:
                    out.append("".join(run))
                run = []
    return "\0\n".join(" ".join(s.split()) for s in out)


def _fragments(message: str) -> list[str]:
    """The runs of words of ``message`` that must be in the code: placeholders cut it,
    and so does ": " (messages are composed of clauses, e.g. ``FILE: KEY: what``)."""
    parts = [c for p in PLACEHOLDER.split(message) for c in p.split(": ")]
    return [p.strip(" :;,()") for p in parts if re.search(r"\b[a-z]{2,} [a-z]{2,}\b", p)]


def documented_messages() -> list[tuple[str, str]]:
    """(where, message) for every message the docs quote by the convention above."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        column: int | None = None
        for number, line in enumerate(lines, 1):
            where = f"{doc.name}:{number}"
            for _, message in INLINE.findall(line):
                found.append((where, message))
            if not line.startswith("|"):
                column = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if column is None:
                heads = [i for i, c in enumerate(cells) if "message" in c or "`error:`" in c]
                column = heads[0] if heads else -1
                continue
            if column < 0 or column >= len(cells) or set(cells[column]) <= set("-: "):
                continue
            for message in re.findall(r"`([^`]+)`", cells[column]):
                found.append((where, message))
    return found


def test_the_convention_finds_the_documented_messages() -> None:
    messages = {m for _, m in documented_messages()}
    assert "account is suspended" in messages
    assert "account suspended: contact the model owner" in messages
    assert "invalid or expired token" in messages
    assert len(messages) >= 30


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_documented_error_types_exist(doc: Path) -> None:
    known = {n for n in dir(sealserve.errors) if n.endswith("Error")}
    known |= {n for n in dir(builtins) if n.endswith("Error")}
    unknown = sorted(set(ERROR_NAME.findall(doc.read_text())) - known)
    assert unknown == [], f"{doc.name} names error types sealserve does not have"


@pytest.mark.parametrize(
    ("where", "message"), documented_messages(), ids=[w for w, _ in documented_messages()]
)
def test_documented_message_is_in_the_code(where: str, message: str) -> None:
    literals = code_literals()
    missing = [f for f in _fragments(message) if " ".join(f.split()) not in literals]
    assert missing == [], f"{where}: {message!r}: not in any string in sealserve/"


def test_a_made_up_message_is_caught() -> None:
    assert _fragments("the flux capacitor is out of range: N")
    assert "the flux capacitor is out of range" not in code_literals()
