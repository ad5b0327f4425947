"""Popup for ``scripts/lora_resize.py``: which LoRA, how to choose the new rank, one file or several.

The 2023 flow (GPU?, verbose?, precision, LoRA, mode, output, several?) with valid precision
names and ranges checked as they are typed: a fixed rank of 1 or more; sv_ratio 1 or more;
sv_fro and sv_cumulative above 0 to 1.
"""

from __future__ import annotations

import os

from ._tool_flow import LORA_EXTS, ToolFlow, number_text, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments"]

TOOL = "lora_resize"
METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
_METHOD_LABELS = {
    "fixed": "fixed: every module gets the same rank",
    "sv_ratio": "sv_ratio: keep singular values above largest / ratio",
    "sv_fro": "sv_fro: keep this share of each module's Frobenius norm",
    "sv_cumulative": "sv_cumulative: keep this share of the sum of singular values",
}
_PARAM_RANGE = {"sv_ratio": dict(low=1), "sv_fro": dict(low=0, high=1, low_open=True),
                "sv_cumulative": dict(low=0, high=1, low_open=True)}
_PARAM_DEFAULT = {"sv_ratio": 2.0, "sv_fro": 0.9, "sv_cumulative": 0.9}


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    model = f.ask("model", "path", "Choose the LoRA file to resize", path_kind="file", filetypes=LORA_EXTS)
    method = f.ask("dynamic_method", "choice", "How should the new rank be chosen?", "fixed", options=METHODS,
                   labels=_METHOD_LABELS)
    dynamic = method != "fixed"
    argv = ["--model", model] + (["--dynamic_method", method] if dynamic else [])
    several = f.ask("several", "yes_no", "Make several resized files at once?", False,
                    help="one file per rank (or per parameter), from values you type or from a txt queue file")
    if several:
        source = f.ask("values_from", "choice", "Where do the values come from?", "list", options=("list", "queue"),
                       labels={"list": "I'll type them", "queue": "a txt queue file"},
                       help="a queue file has one entry per line: a rank, or 'param max_rank' for the dynamic methods")
        if source == "queue":
            argv += ["--queue", f.ask("queue", "path", "Choose the txt queue file", path_kind="file", filetypes=(".txt",))]
        elif dynamic:
            params = f.ask_numbers("dynamic_param", f"Values of {method}, separated by spaces",
                                   number_text(_PARAM_DEFAULT[method]), **_PARAM_RANGE[method])
            ranks = f.ask_numbers("new_rank", "Highest rank: one value, or one per value above", "64", integer=True,
                                  low=1, count=lambda n: None if n in (1, len(params)) else
                                  f"give 1 rank or {len(params)} (one per value), not {n}")
            argv += ["--dynamic_param", *map(number_text, params), "--new_rank", *map(number_text, ranks)]
        else:
            ranks = f.ask_numbers("new_rank", "New ranks, separated by spaces", "32 16 8", integer=True, low=1)
            argv += ["--new_rank", *map(number_text, ranks)]
        argv += f.ask_save_folder("Folder for the resized files", os.path.dirname(model))
    else:
        if dynamic:
            param = f.ask("dynamic_param", "number", f"Value of {method}", _PARAM_DEFAULT[method], **_PARAM_RANGE[method])
            rank = f.ask("new_rank", "number", "Highest rank a module may keep", 64, integer=True, low=1)
            argv += ["--dynamic_param", number_text(param), "--new_rank", str(rank)]
            name = f"{method}-{number_text(param)}-{rank}"
        else:
            rank = f.ask("new_rank", "number", "New rank", 32, integer=True, low=1)
            argv += ["--new_rank", str(rank)]
            name = f"fixed-{rank}"
        stem = os.path.splitext(model)[0]
        argv += f.ask_save_file("Save the resized LoRA as", f"{stem}-{name}.safetensors", LORA_EXTS)
    argv += f.ask_precision(default="fp16")
    argv += f.ask_device()
    if f.ask("verbose", "yes_no", "Print each module's retained norm?", False):
        argv.append("--verbose")
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/lora_resize.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
