"""How fast ``python main.py -h`` answers, next to what importing the engine's libraries costs.

    python bench/startup.py [runs]

``-h`` must not import torch or diffusers, and must answer in under 0.5 s (issue 12); the second
figure shows what that saves. Both are measured in this run, as fresh processes, and the medians of
the wall time and of the CPU time (user + system: on a busy machine the wall time waits for a core)
are printed with their ratio. Bytecode caches are used as they are: with ``PYTHONDONTWRITEBYTECODE``
set every run compiles the sources again (about 30 ms more CPU).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median_seconds(command: list[str], runs: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``runs`` fresh processes."""
    walls, cpus = [], []
    for _ in range(runs):
        start, cpu = time.perf_counter(), _children_cpu()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
        walls.append(time.perf_counter() - start)
        cpus.append(_children_cpu() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    bare = _median_seconds([sys.executable, "-c", "pass"], runs)
    help_time = _median_seconds([sys.executable, os.path.join(ROOT, "main.py"), "-h"], runs)
    engine = _median_seconds([sys.executable, "-c", "import torch, diffusers"], max(1, runs // 2))
    print(f"median of {runs} runs, fresh processes, {sys.executable}")
    print("                                 wall       CPU")
    for label, (wall, cpu) in (("python -c pass", bare), ("python main.py -h", help_time),
                               ("import torch, diffusers", engine)):
        print(f"  {label:<25} {wall * 1000:7.0f} ms {cpu * 1000:7.0f} ms")
    print(f"  -h is {engine[0] / help_time[0]:.1f}x faster than importing the engine's libraries; "
          f"{'under' if help_time[0] < 0.5 else 'OVER'} issue 12's 0.5 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
