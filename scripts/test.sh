#!/usr/bin/env bash
# The test command: installs everything it needs, then runs lint, types, the import
# layering check, the protobuf-runtime check and the test suite.
source "$(dirname "$0")/_env.sh"
ensure_os_packages
ensure_venv dev
export PATH="$VENV/bin:$PATH"
echo "==> ruff";          ruff check .
echo "==> mypy (strict)"; mypy
echo "==> import layering"; lint-imports
echo "==> protobuf runtimes 5.x-7.x"; python scripts/check_protobuf_runtimes.py
echo "==> pytest";        pytest -q "$@"
