# Sourced by the .sh launchers beside README.md after they set $here to their own folder: picks the Python
# (.venv made by install.sh, or LETS_PYTHON) as $py and puts the project on PYTHONPATH. Not run by itself.
py="${LETS_PYTHON:-$here/.venv/bin/python}"
if [ ! -x "$py" ] && ! command -v "$py" >/dev/null 2>&1; then
    echo "No Python environment at $here/.venv: run install.sh first (or set LETS_PYTHON)." >&2
    exit 1
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
