"""Popup for ``scripts/image_resize.py``: downscale a dataset to several sizes.

The 2023 flow: source and output folders, a checkbox per size (closing keeps 512, 384, 256 and
128), and the interpolation.
"""

from __future__ import annotations

import os

from ._tool_flow import ToolFlow, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments", "SIZES", "DEFAULT_SIZES"]

TOOL = "image_resize"
SIZES = (832, 768, 512, 384, 256, 128)
DEFAULT_SIZES = [512, 384, 256, 128]


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    src = f.ask("src", "path", "Choose the dataset folder to downscale", path_kind="dir")
    dst = f.ask("dst", "path", "Choose the output folder (one subfolder per size)", src.rstrip("/\\") + "_resized",
                path_kind="out_dir",
                check=lambda p: "the output folder must be outside the dataset folder" if _inside(p, src) else None)
    sizes = f.ask("sizes", "checks", "Which sizes?", DEFAULT_SIZES, options=SIZES,
                  labels={s: f"{s}x{s}" for s in SIZES}, low=1)
    interpolation = f.ask("interpolation", "choice", "Which downscaling filter?", "area",
                          options=("area", "cubic", "lanczos4"))
    argv = ["--src", src, "--dst", dst, "--sizes", *map(str, sizes), "--interpolation", interpolation]
    taken = [s for s in sizes if os.path.isdir(os.path.join(dst, str(s))) and os.listdir(os.path.join(dst, str(s)))]
    if taken and f.ask("overwrite", "yes_no", f"{dst} already has files for {', '.join(map(str, taken))}. Replace them?",
                       False, help=f.help.get("overwrite", "")):
        argv.append("--overwrite")
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/image_resize.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
