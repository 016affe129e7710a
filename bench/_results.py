"""Write one benchmark's section of bench/RESULTS.md (between markers), keeping the rest."""

from __future__ import annotations

import datetime as dt
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by the command shown in it, on this project's 2-core\n"
    "machine class. The machine is shared and noisy: read ratios measured side by side\n"
    "in one run, not absolute times.\n"
)


def write_section(name: str, command: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    # A section's own headings sit one level below the section's.
    body = "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {name}:start -->\n"
        f"## {name}\n\n"
        f"Command: `{command}`  \n"
        f"Run: {stamp} on {platform.machine()}, Python {platform.python_version()}\n\n"
        f"{body.strip()}\n"
        f"<!-- {name}:end -->"
    )
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
