"""How fast ``python main.py -h`` answers, next to what importing the engine's libraries costs.

    python bench/startup.py [runs]

``-h`` must not import torch or diffusers; the second figure shows what that saves. Both are
measured in this run, as fresh processes, and the medians are printed with their ratio.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    bare = _median_seconds([sys.executable, "-c", "pass"], runs)
    help_time = _median_seconds([sys.executable, os.path.join(ROOT, "main.py"), "-h"], runs)
    engine = _median_seconds([sys.executable, "-c", "import torch, diffusers"], max(1, runs // 2))
    print(f"median of {runs} runs, fresh processes, {sys.executable}")
    print(f"  python -c pass              {bare * 1000:7.0f} ms")
    print(f"  python main.py -h           {help_time * 1000:7.0f} ms")
    print(f"  import torch, diffusers     {engine * 1000:7.0f} ms")
    print(f"  -h is {engine / help_time:.1f}x faster than importing the engine's libraries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
