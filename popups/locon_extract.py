"""Popup for ``scripts/locon_extract.py``: a LoRA / LoCon from the difference of two checkpoints.

The 2023 flow (device, mode, models, output, one or several extractions) with each mode's values
checked as typed: whole ranks for fixed, above 0 for threshold, above 0 to 1 for ratio and
quantile. The extractor writes plain LoRA/LoCon layers (no Tucker), so the 2023 cp question,
whose answer landed in the wrong slot, is not asked.
"""

from __future__ import annotations

import os

from ._tool_flow import CHECKPOINT_EXTS, ToolFlow, number_text, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments"]

TOOL = "locon_extract"
MODES = ("fixed", "threshold", "ratio", "quantile")
_MODE_LABELS = {
    "fixed": "fixed: the same rank for every module",
    "threshold": "threshold: keep singular values above a value",
    "ratio": "ratio: keep singular values above this share of the largest",
    "quantile": "quantile: keep this share of the singular values' sum",
}
_RANGE = {"fixed": dict(integer=True, low=1), "threshold": dict(low=0, low_open=True),
          "ratio": dict(low=0, high=1, low_open=True), "quantile": dict(low=0, high=1, low_open=True)}
_DEFAULTS = {"fixed": (64, 32), "threshold": (0.05, 0.05), "ratio": (0.5, 0.5), "quantile": (0.75, 0.75)}
_NO_CONV = "none: only linear layers (a plain LoRA)"


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    base = f.ask("base", "path", "Choose the original (base) checkpoint", path_kind="file", filetypes=CHECKPOINT_EXTS)
    tuned = f.ask("tuned", "path", "Choose the fine-tuned checkpoint", path_kind="file", filetypes=CHECKPOINT_EXTS,
                  check=lambda p: "this is the base checkpoint; choose the fine-tuned one" if p == base else None)
    mode = f.ask("mode", "choice", "How should each module's rank be chosen?", "fixed", options=MODES,
                 labels=_MODE_LABELS)
    argv = ["--base", base, "--tuned", tuned, "--mode", mode]
    linear_default, conv_default = _DEFAULTS[mode]
    if f.ask("several", "yes_no", "Make several extractions from these checkpoints?", False,
             help="one file per pair of values, from values you type or from a txt queue file"):
        source = f.ask("values_from", "choice", "Where do the values come from?", "list", options=("list", "queue"),
                       labels={"list": "I'll type them", "queue": "a txt queue file ('linear conv' per line)"},
                       help="a queue file has one entry per line: 'linear conv', or just 'linear'")
        if source == "queue":
            argv += ["--queue", f.ask("queue", "path", "Choose the txt queue file", path_kind="file", filetypes=(".txt",))]
        else:
            linear = f.ask_numbers("linear_param", "Values for the linear layers, separated by spaces",
                                   f"{number_text(linear_default)} {number_text(linear_default / 2)}", **_RANGE[mode])
            conv = f.ask_numbers("conv_param", "Values for the 3x3 convolutions: one, one per linear value, or empty",
                                 "", optional=True, none_label=_NO_CONV, **_RANGE[mode],
                                 count=lambda n: None if n in (1, len(linear)) else
                                 f"give 1 value or {len(linear)} (one per linear value), not {n}")
            argv += ["--linear_param", *map(number_text, linear)]
            if conv:
                argv += ["--conv_param", *map(number_text, conv)]
        argv += f.ask_save_folder("Folder for the extracted files", os.path.dirname(tuned))
    else:
        linear = f.ask("linear_param", "number", "Value for the linear layers", linear_default, **_RANGE[mode])
        conv = f.ask("conv_param", "number", "Value for the 3x3 convolutions (empty: none)", conv_default,
                     optional=True, none_label=_NO_CONV, **_RANGE[mode])
        argv += ["--linear_param", number_text(linear)]
        if conv is not None:
            argv += ["--conv_param", number_text(conv)]
        kind = "locon" if conv is not None else "lora"
        argv += f.ask_save_file("Save the extracted network as",
                                f"{os.path.splitext(tuned)[0]}-{kind}.safetensors", (".safetensors", ".ckpt", ".pt"))
    argv += f.ask_precision()
    argv += f.ask_device()
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/locon_extract.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
