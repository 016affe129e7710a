#!/usr/bin/env bash
# The main job: installs sealserve (server + red-team extras: the demo trains a replica
# to show the watermark), then runs `sealserve demo`.
source "$(dirname "$0")/_env.sh"
ensure_venv redteam
exec "$VENV/bin/sealserve" demo "$@"
