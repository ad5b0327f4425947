#!/usr/bin/env bash
# Edit the tags of every caption in a dataset. With no arguments the questions open in windows; otherwise: ./edit_tags.sh --help
# Works from any folder and from paths with spaces. Uses .venv (made by install.sh) unless
# LETS_PYTHON names another Python.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/scripts/launcher.sh"  # $py: .venv or LETS_PYTHON; the project on PYTHONPATH
if [ "$#" -eq 0 ]; then set -- --popup; fi
exec "$py" "$here/scripts/edit_tags.py" "$@"
