#!/usr/bin/env bash
# Set up, then run the test suite. Tests that need ../shared/data/cosmos_real skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/python -m pytest -ra "$@"
