# Shared set-up for scripts/test.sh and scripts/demo.sh: OS packages and the venv.
# Sourced, not run. Idempotent: a second run installs nothing new.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(command -v python3.11 || command -v python3)"
VENV="${SEALSERVE_VENV:-$ROOT/.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_os_packages() {
  # redis-server: the quota/state-store tests start a real one on loopback.
  # curl: the REST tests call a running server with it (tests/server/rest).
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # cpio: deploy/measured-image/build.sh packs the initramfs (tests/deploy).
  command -v cpio >/dev/null 2>&1 || missing+=(cpio)
  # swtpm, tpm2-tools: the azure-vtpm platform drives a TPM through tpm2-tools; the
  # tests give it a software TPM (tests/_vtpm.py).
  command -v swtpm >/dev/null 2>&1 || missing+=(swtpm)
  command -v tpm2_quote >/dev/null 2>&1 || missing+=(tpm2-tools)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing OS packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_venv() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  echo "==> installing sealserve[$extras] into $VENV"
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
}
