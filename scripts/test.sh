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
echo "==> pytest";        pytest -q "$@"
