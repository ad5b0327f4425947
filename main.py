#!/usr/bin/env python
"""Train a LoRA or LyCORIS network for Stable Diffusion.

    python main.py                         settings from ArgsList.py
    python main.py --load_json_path x.json settings from a JSON file (ours, the 2023 tool's, kohya_ss GUI)
    python main.py --net_dim 16 ...        any setting as a flag; flags win over JSON, JSON over ArgsList.py
    python main.py --multi_run_path DIR    train every JSON file in DIR, one after another
    python main.py --popup                 answer questions in windows
    python main.py -h                      every setting, grouped, with its default

Also runs as ``accelerate launch main.py ...``.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from frontend.app import run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
