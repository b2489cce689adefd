#!/usr/bin/env bash
# Sets everything up, then runs a node on the embedded defaults (arguments go to `mycellm serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mycellm serve "$@"
