#!/usr/bin/env bash
# The floor-versions job: install every dependency at the lowest version requirements.txt
# declares (">=X" becomes "==X"), in a venv of its own, and run the tests that exercise the
# archive code plus a sample-mode smoke run. A floor that the code outgrew fails here.
# The browser test's packages (jupyterlab, playwright) are left out: the job does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MBPHOT_FLOOR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mbphot/venv-floor}"
started=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
# Numba's compiled kernels of the floor versions apart from the main environment's, which share
# this source tree: neither recompiles the other's every run, nor reads a file the other wrote.
export NUMBA_CACHE_DIR="$VENV/numba-cache"
floors="$(mktemp)"
trap 'rm -f "$floors"' EXIT
grep -v -E '^\s*(#|$)' requirements.txt | grep -v -E '^(jupyterlab|playwright)\b' | sed -E 's/>=/==/' >"$floors"
echo "ci/floor.sh: installing the floors into $VENV:" $(tr '\n' ' ' <"$floors")
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$floors"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>/dev/null ||
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
  grep -i -E '^(numpy|astropy|pyvo|astroquery|requests|pandas|scipy) ' | tr -s ' ' | paste -sd ';' -

# The archive tests without the notebook run (the smoke run below covers the notebooks at the floors).
"$VENV/bin/python" -m pytest -ra -p no:cacheprovider -m "not slow and not live" tests/test_archive.py tests/test_archive_live.py

smoke="$(mktemp -d)"
trap 'rm -f "$floors"; rm -rf "$smoke"' EXIT
(cd "$smoke" && "$VENV/bin/python" -m mbphot run --no-progress --radius 1 --bands irac1,nuv \
  --data-dir data --output-dir output)
test -s "$smoke/output/catalog/multiband_catalog.parquet"
echo "ci/floor.sh: floor versions passed in $(( $(date +%s) - started )) s"
