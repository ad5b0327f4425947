#!/usr/bin/env bash
# Update to the newest version (git pull) and bring the installed packages in step.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
git pull --ff-only
if [ -x .venv/bin/python ]; then
    .venv/bin/python -m pip install -r requirements.txt
    if .venv/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
        # installed with --gpu: keep the GPU onnxruntime, not requirements.txt's CPU one (they share one folder)
        .venv/bin/python -m pip uninstall -y -q onnxruntime onnxruntime-gpu
        .venv/bin/python -m pip install -c constraints.txt -r requirements-gpu.txt
    fi
else
    echo "No .venv yet: run ./install.sh" >&2
fi
