#!/usr/bin/env bash
# Build sealserve from this source tree and install it, with the extras of its role
# (default: server), into a self-contained virtualenv at PREFIX.
#
#   deploy/build.sh --prefix DIR [--wheel-dir DIR] [--python PYTHON] [--extras LIST]
#                   [--strip-pip]
#
# The Dockerfile's builder stage runs this script, and so does the test suite
# (tests/deploy/test_build_script.py), so the image recipe is exercised on machines
# without a container engine. What it does:
#   1. copies the source tree (without VCS, caches and old build output) to a scratch
#      directory and builds the wheel there, so stale files in build/ can never leak
#      into the wheel and change the code digest;
#   2. creates a virtualenv at PREFIX and installs the wheel with the extras LIST
#      (comma-separated: server, redteam; default server);
#   3. strips what a server does not need (byte-code caches, test suites of the
#      dependencies, setuptools; pip too with --strip-pip, which images use: without
#      it the venv stays extendable, `PREFIX/bin/pip install 'sealserve[redteam]'`) --
#      never anything inside the sealserve package, whose files are measured into the
#      workload manifest;
#   4. prints what it installed and the code digest of the INSTALLED package (the
#      value `sealserve measure` reports), measured outside the source tree.
# Pip settings (index, cache, proxies) come from the usual PIP_* environment variables.
set -euo pipefail

usage() {
  echo "usage: deploy/build.sh --prefix DIR [--wheel-dir DIR] [--python PYTHON]" \
    "[--extras LIST] [--strip-pip]" >&2
  exit 2
}

PREFIX=""
WHEEL_DIR=""
PYTHON="${PYTHON:-python3}"
EXTRAS="server"
STRIP_PIP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || usage; PREFIX="$2"; shift 2 ;;
    --wheel-dir) [ $# -ge 2 ] || usage; WHEEL_DIR="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || usage; PYTHON="$2"; shift 2 ;;
    --extras) [ $# -ge 2 ] || usage; EXTRAS="$2"; shift 2 ;;
    --strip-pip) STRIP_PIP=1; shift ;;
    -h|--help) usage ;;
    *) echo "deploy/build.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$PREFIX" ] || usage
for extra in ${EXTRAS//,/ }; do
  case "$extra" in
    server|redteam) ;;
    *) echo "deploy/build.sh: unknown extra '${extra:0:40}' (known: server, redteam)" >&2; exit 2 ;;
  esac
done
[ -n "${EXTRAS//,/}" ] || { echo "deploy/build.sh: --extras names no extra" >&2; exit 2; }
if [ -e "$PREFIX" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
  echo "deploy/build.sh: $PREFIX exists and is not empty; refusing to install over it" >&2
  exit 1
fi

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
[ -n "$WHEEL_DIR" ] || WHEEL_DIR="$SCRATCH/wheels"
mkdir -p "$WHEEL_DIR"

# Fixed archive timestamps: the wheel of one commit is the same bytes on every build.
# (The code digest covers only paths and contents, so it is reproducible either way.)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || echo 315532800)"
fi
export SOURCE_DATE_EPOCH
export PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "==> copying the source tree from $SRC"
tar -C "$SRC" \
  --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude='*.pyc' --exclude=.mypy_cache --exclude=.pytest_cache \
  --exclude=.ruff_cache \
  -cf - pyproject.toml README.md sealserve | tar -C "$SCRATCH" -xf - --one-top-level=src

echo "==> creating the virtualenv $PREFIX"
"$PYTHON" -m venv "$PREFIX"
VPY="$PREFIX/bin/python"

echo "==> building the wheel into $WHEEL_DIR"
"$VPY" -m pip wheel -q --no-deps --wheel-dir "$WHEEL_DIR" "$SCRATCH/src"
WHEEL="$(ls -t "$WHEEL_DIR"/sealserve-*.whl | head -n 1)"
echo "    $(basename "$WHEEL") sha256 $(sha256sum "$WHEEL" | cut -d' ' -f1)"

echo "==> installing $(basename "$WHEEL")[$EXTRAS]"
"$VPY" -m pip install -q --no-compile "${WHEEL}[${EXTRAS}]"

echo "==> installed packages"
"$VPY" -m pip list --format=freeze | sed 's/^/    /'

if [ "$STRIP_PIP" = 1 ]; then
  echo "==> stripping pip, setuptools, byte-code caches and dependency test suites"
  "$VPY" -m pip uninstall -q -y pip setuptools wheel >/dev/null 2>&1 || true
else
  echo "==> stripping setuptools, byte-code caches and dependency test suites (pip kept:"
  echo "    add an extra later with $PREFIX/bin/pip install 'sealserve[redteam]')"
  "$VPY" -m pip uninstall -q -y setuptools wheel >/dev/null 2>&1 || true
fi
SITE="$("$VPY" -B -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
find "$PREFIX" -depth -type d -name __pycache__ -exec rm -rf {} +
find "$SITE" -mindepth 2 -depth -type d -name tests -not -path "$SITE/sealserve/*" -exec rm -rf {} +
rm -rf "$PREFIX/share" "$PREFIX/include"

echo "==> result"
# Isolated (-I: no PYTHONPATH, no user site, no current directory on sys.path) and run
# from / so the package measured is the one installed, never the checkout's.
(cd / && "$VPY" -I -B - <<'PY'
import sealserve
from sealserve.enclave.manifest import code_digest
print(f"    sealserve {sealserve.__version__} at {sealserve.__file__.rsplit('/', 1)[0]}")
print(f"    code digest {code_digest()}")
PY
)
echo "    size $(du -sh "$PREFIX" | cut -f1)"
echo "    entry point $PREFIX/bin/sealserve"
