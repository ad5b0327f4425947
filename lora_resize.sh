#!/usr/bin/env bash
# Resize a LoRA to a smaller rank. With no arguments the questions open in windows; otherwise: ./lora_resize.sh --help
# Works from any folder and from paths with spaces. Uses .venv (made by install.sh) unless
# LETS_PYTHON names another Python.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/scripts/launcher.sh"  # $py: .venv or LETS_PYTHON; the project on PYTHONPATH
if [ "$#" -eq 0 ]; then set -- --popup; fi
exec "$py" "$here/scripts/lora_resize.py" "$@"
