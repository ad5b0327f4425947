"""Run a training command line in this process and write when each optimizer step ended (not a test).

    python bench/step_clock.py OUT.json SCRIPT.py ARGS...     a script, as ``python SCRIPT.py ARGS`` runs it
    python bench/step_clock.py OUT.json -m MODULE ARGS...      a module, as ``python -m MODULE ARGS`` runs it

Both our trainer and kohya's ``train_network.py`` draw a tqdm bar named "steps" and update it once per optimizer
step, so the times of those updates are the step times of either, measured the same way. ``OUT.json`` gets
``{"start": wall time when this process began running Python, "steps": [wall time of each step], "cpu": [this
process's CPU seconds (user + system, all its threads) at each step],
"rss_before_steps_mb": peak RSS when the first step ended (loading and caching), "peak_rss_mb": at exit}``.
Only the standard library and tqdm are used, so it runs under any trainer's Python.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import time

START = time.time()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    out, rest = sys.argv[1], sys.argv[2:]
    record: dict = {"start": START, "steps": [], "cpu": [], "rss_before_steps_mb": None, "peak_rss_mb": None}

    import tqdm.std

    original = tqdm.std.tqdm.update

    def update(self, n=1):
        if str(getattr(self, "desc", "") or "").startswith("steps") and n:
            if not record["steps"]:
                record["rss_before_steps_mb"] = _peak_rss_mb()
            record["steps"].append(time.time())
            record["cpu"].append(time.process_time())
        return original(self, n)

    tqdm.std.tqdm.update = update

    def write() -> None:
        record["peak_rss_mb"] = _peak_rss_mb()
        with open(out, "w", encoding="utf-8") as f:
            json.dump(record, f)

    atexit.register(write)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
