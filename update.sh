#!/usr/bin/env bash
# Update to the newest version (git pull) and bring the installed packages in step.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
git pull --ff-only
if [ -x .venv/bin/python ]; then
    .venv/bin/python -m pip install -r requirements.txt
else
    echo "No .venv yet: run ./install.sh" >&2
fi
