#!/usr/bin/env bash
# Set up, then run the whole pipeline on the embedded simulated COSMOS field (no network).
# Extra arguments go to `mbphot run`, e.g. `bash ci/run.sh --radius 2 --bands irac1,nuv`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/mbphot run "$@"
