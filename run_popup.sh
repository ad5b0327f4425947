#!/usr/bin/env bash
# Train by answering questions in windows: ./run_popup.sh
# Works from any folder and from paths with spaces. Uses .venv (made by install.sh) unless
# LETS_PYTHON names another Python.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/scripts/launcher.sh"  # $py: .venv or LETS_PYTHON; the project on PYTHONPATH
exec "$py" "$here/main.py" --popup "$@"
