#!/usr/bin/env python3
"""Run one benchmark command and record its output in bench/RESULTS.md.

    python bench/record.py "Key release" -- python bench/bench_key_release.py

The section holds the exact command and what it printed (tables in markdown).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._results import write_section  # noqa: E402


def main() -> int:
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        print(__doc__)
        return 2
    name, cmd = sys.argv[1], sys.argv[3:]
    shown = ["python" if c == sys.executable or c.endswith("/bin/python") else c for c in cmd]
    env_cmd = "python bench/record.py " + shlex.join([name, "--", *shown])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    print(out.stdout)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    write_section(name, env_cmd, out.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
