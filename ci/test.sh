#!/usr/bin/env bash
# Set up, then run the test suite. Tests that need ../shared/data/cosmos_real skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh

# tests/test_browser.py drives the notebook's control panel in Debian's Chromium (Playwright's
# own browser download is not used). Installing it needs root or password-less sudo; where
# neither is available that test skips, saying so.
apt_as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get "$@"
  else
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get "$@"
  fi
}
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt_as_root install -y -q chromium || { apt_as_root update -q && apt_as_root install -y -q chromium; } ||
    echo "ci/test.sh: could not install chromium; tests/test_browser.py will skip" >&2
fi

.venv/bin/python -m pytest -ra "$@"
