"""kohya's ``sdxl_train_network.py``: ``python -m sd_scripts.sdxl_train_network --flag value ...``.

The engine's command line (:mod:`sd_scripts.train_network`: every TrainConfig setting under kohya's name) with
the model family fixed to SDXL, so a kohya SDXL command line runs unchanged and an SD1/SD2 model is refused
before anything is loaded. ``train_network`` detects SDXL by itself; this entry point exists for the people and
scripts that call kohya's SDXL script by name.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sd_scripts import train_network  # noqa: E402

PROG = "sdxl_train_network.py"
FIXED = {"sdxl": True}


def main(argv: list[str] | None = None) -> int:
    return train_network.main(argv, prog=PROG, fixed=FIXED)


if __name__ == "__main__":
    sys.exit(main())
