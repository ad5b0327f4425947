"""Popup for ``scripts/dataset_report.py``: a report on a dataset before training.

The dataset (a folder, or the dataset of a saved training JSON), the settings that decide the buckets and steps
(resolution, buckets, batch size; a folder of loose images also its repeats), then where the picture goes.
Closing a window keeps ArgsList.py's default, as the training would.
"""

from __future__ import annotations

import os

from ._tool_flow import ToolFlow, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments"]

TOOL = "dataset_report"


def _defaults():
    from ArgsList import ArgStore

    return ArgStore()


def _loose_images(folder: str) -> bool:
    """Images directly inside ``folder`` and no ``<repeats>_<name>`` folders (the tool's one-subset case)."""
    from sd_scripts.data.dataset_layout import parse_folder_name
    from sd_scripts.data.images import is_image_file

    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(e.is_dir() and (parse_folder_name(e.name) or (0,))[0] >= 1 for e in entries):
        return False
    return any(e.is_file() and is_image_file(e.name) for e in entries)


def _report_name(source: str) -> str:
    base = os.path.normpath(source)
    name = os.path.splitext(os.path.basename(base))[0] if os.path.isfile(base) else os.path.basename(base)
    return os.path.join(os.path.dirname(base), f"{name}_report.png")


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    defaults = _defaults()
    source = f.ask("source", "choice", "What should the report look at?", "folder", options=("folder", "json"),
                   labels={"folder": "A dataset folder", "json": "The dataset of a saved training JSON"},
                   help="a JSON brings its own resolution, buckets and batch size")
    if source == "json":
        path = f.ask("json", "path", "Choose the training JSON", path_kind="file", filetypes=(".json",))
        argv = ["--json", path]
    else:
        path = f.ask("train_data_dir", "path", "Choose the dataset folder (the one holding the <repeats>_<name> "
                     "folders, or the images)", path_kind="dir")
        argv = [path]
        resolution = f.ask("resolution", "number", "Training resolution (pixels per side)", defaults.train_resolution,
                           integer=True, low=64, high=4096)
        argv += ["--resolution", str(resolution)]
        buckets = f.ask("enable_bucket", "yes_no", "Use aspect-ratio buckets?", defaults.buckets)
        argv.append("--enable_bucket" if buckets else "--no_bucket")
        batch = f.ask("batch_size", "number", "Batch size", defaults.batch_size, integer=True, low=1, high=256)
        argv += ["--batch_size", str(batch)]
        if _loose_images(path):
            repeats = f.ask("repeats", "number", "The images are directly in the folder: how many repeats per "
                            "epoch?", 1, integer=True, low=1, high=10000)
            argv += ["--repeats", str(repeats)]
    default = _report_name(path)
    while True:
        png = f.ask("save_to", "path", "Where should the report picture go? (the text goes beside it)", default,
                    path_kind="save_file", filetypes=(".png",))
        taken = [p for p in (png, os.path.splitext(png)[0] + ".txt") if os.path.exists(p)]
        if not taken:
            return argv + ["--save_to", png]
        names = " and ".join(os.path.basename(p) for p in taken)
        if f.ask("overwrite", "yes_no", f"{names} already exist{'s' if len(taken) == 1 else ''}. Replace?", False):
            return argv + ["--save_to", png, "--overwrite"]
        default = png


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/dataset_report.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
