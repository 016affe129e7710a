#!/usr/bin/env python3
"""Print the server settings reference (a markdown table) from the pydantic model.

README.md embeds this table between <!-- config:start --> and <!-- config:end -->;
tests/test_readme.py fails when it is stale. `--write` updates README.md in place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def table() -> str:
    from sealserve.server.settings import EngineSettings, RestSettings, Settings

    rows = ["| key | default | meaning |", "|---|---|---|"]

    def add(prefix: str, model: type) -> None:
        for name, field in model.model_fields.items():
            default = field.default
            if hasattr(type(default), "model_fields"):
                add(f"{prefix}{name}.", type(default))
                continue
            shown = "(none)" if default is None else f"`{default!s}`"
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {shown} | {desc} |")

    add("", Settings)
    add("rest.", RestSettings)  # an optional table: its keys when [rest] is set
    del EngineSettings
    return "\n".join(rows)


def main() -> int:
    text = table()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        body = readme.read_text()
        new = re.sub(
            r"<!-- config:start -->.*?<!-- config:end -->",
            lambda _m: f"<!-- config:start -->\n{text}\n<!-- config:end -->",
            body,
            flags=re.S,
        )
        readme.write_text(new)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
