#!/usr/bin/env bash
# The main job: installs sealserve with the server extra, then runs `sealserve demo`.
source "$(dirname "$0")/_env.sh"
ensure_venv server
exec "$VENV/bin/sealserve" demo "$@"
