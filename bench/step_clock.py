"""Run a training command line in this process and write when each optimizer step ended (not a test).

    python bench/step_clock.py OUT.json SCRIPT.py ARGS...     a script, as ``python SCRIPT.py ARGS`` runs it
    python bench/step_clock.py OUT.json -m MODULE ARGS...      a module, as ``python -m MODULE ARGS`` runs it

Both our trainer and kohya's ``train_network.py`` draw a tqdm bar named "steps" and update it once per optimizer
step, so the times of those updates are the step times of either, measured the same way. ``OUT.json`` gets
``{"start": wall time when this process began running Python, "steps": [wall time of each step], "cpu": [this
process's CPU seconds (user + system, all its threads) at each step],
"rss_before_steps_mb": peak RSS when the first step ended (loading and caching), "peak_rss_mb": at exit}``.
Only the standard library and tqdm are used, so it runs under any trainer's Python.

With ``STEP_CLOCK_PROFILE=FILE`` (and ``STEP_CLOCK_PROFILE_STEPS=A:B``, default ``3:6``) torch.profiler records
steps A+1 to B and ``FILE`` gets its operators by self CPU time: the same table for either trainer.
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


class _Profile:
    """torch.profiler over the steps ``first+1..last`` when a file is given (torch is imported only then)."""

    def __init__(self, path: str | None, steps: str):
        self.path = path
        self.first, self.last = (int(x) for x in steps.split(":"))
        self.prof = None

    def at_step(self, step: int) -> None:
        if not self.path:
            return
        if step == self.first:
            import torch

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        elif step == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(f"steps {self.first + 1}-{self.last}\n{table}\n")
            self.prof = None


def main() -> None:
    out, rest = sys.argv[1], sys.argv[2:]
    record: dict = {"start": START, "steps": [], "cpu": [], "rss_before_steps_mb": None, "peak_rss_mb": None}

    import tqdm.std

    original = tqdm.std.tqdm.update

    profile = _Profile(os.environ.get("STEP_CLOCK_PROFILE"), os.environ.get("STEP_CLOCK_PROFILE_STEPS", "3:6"))

    def update(self, n=1):
        if str(getattr(self, "desc", "") or "").startswith("steps") and n:
            if not record["steps"]:
                record["rss_before_steps_mb"] = _peak_rss_mb()
            record["steps"].append(time.time())
            record["cpu"].append(time.process_time())
            profile.at_step(len(record["steps"]))
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
