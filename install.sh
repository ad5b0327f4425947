#!/usr/bin/env bash
# Install LoRA Easy Training Scripts into ./.venv (Linux/macOS).
#   bash install.sh          the trainer and tools
#   bash install.sh --test   also the test dependencies (pytest, peft)
#   bash install.sh --gpu    also xformers and onnxruntime-gpu (CUDA machines only)
# torch==2.13.0 is installed first; set TORCH_INDEX_URL to pick a build, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash install.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
want_test=0; want_gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --gpu) want_gpu=1 ;;
    *) echo "install.sh: unknown option $arg (use --test or --gpu)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3.12 python3.10 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ -z "$py" ]; then echo "install.sh: Python 3.10-3.12 not found; install it and run again" >&2; exit 2; fi
if ! "$py" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
  echo "install.sh: $("$py" --version 2>&1) found; Python 3.10-3.12 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 2
fi
if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then "${pip[@]}" torch==2.13.0 --index-url "$TORCH_INDEX_URL"; else "${pip[@]}" torch==2.13.0; fi
fi
"${pip[@]}" -r requirements.txt
if [ "$want_test" = 1 ]; then "${pip[@]}" -r requirements-test.txt; fi
if [ "$want_gpu" = 1 ]; then
  # onnxruntime-gpu and requirements.txt's onnxruntime share one folder: only the GPU build may stay
  .venv/bin/python -m pip uninstall -y -q onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
  "${pip[@]}" -c constraints.txt -r requirements-gpu.txt
fi
if .venv/bin/python -c 'import torchvision' >/dev/null 2>&1; then
  echo "install.sh: torchvision is installed in .venv and breaks transformers with this torch; run: .venv/bin/pip uninstall -y torchvision" >&2
  exit 1
fi
echo "installed into $here/.venv"
