#!/usr/bin/env bash
# Write natural-language captions for a folder of images. With no arguments the questions open in windows; otherwise: ./caption_images.sh --help
# Works from any folder and from paths with spaces. Uses .venv (made by install.sh) unless
# LETS_PYTHON names another Python.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${LETS_PYTHON:-$here/.venv/bin/python}"
if [ ! -x "$py" ] && ! command -v "$py" >/dev/null 2>&1; then
    echo "No Python environment at $here/.venv: run install.sh first (or set LETS_PYTHON)." >&2
    exit 1
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ "$#" -eq 0 ]; then set -- --popup; fi
exec "$py" "$here/scripts/caption_images.py" "$@"
