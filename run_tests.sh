#!/usr/bin/env bash
# Install (with test dependencies) and run the test suite. Extra arguments go to pytest.
# The test files run in TEST_WORKERS processes (pytest-xdist, one file per worker at a time; default 2, the cores of
# the CI machine; TEST_WORKERS=0 runs them in this process), each with one torch thread.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
bash install.sh --test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
[ "${TEST_WORKERS:-2}" = 0 ] && workers=()
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1024x768x24" .venv/bin/python -m pytest "${workers[@]}" "$@"
fi
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
