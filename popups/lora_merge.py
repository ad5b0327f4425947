"""Popup for ``scripts/lora_merge.py``: LoRAs together into one, or into a checkpoint.

The 2023 flow with its bugs fixed: the cpu/gpu choice is honoured as answered, the script runs on
every platform, and closing the slider window keeps each ratio's default (1) instead of 0.5.
One slider per LoRA, from -1 to 4.
"""

from __future__ import annotations

import os

from ._tool_flow import CHECKPOINT_EXTS, LORA_EXTS, ToolFlow, number_text, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments", "RATIO_RANGE"]

TOOL = "lora_merge"
RATIO_RANGE = (-1.0, 4.0)


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    argv: list[str] = []
    into_model = f.ask("into_model", "yes_no", "Merge into a checkpoint (make a new model)?", False,
                       help="no: merge the LoRAs together into one LoRA file")
    if into_model:
        argv += ["--sd_model", f.ask("sd_model", "path", "Choose the checkpoint to merge into", path_kind="file",
                                     filetypes=CHECKPOINT_EXTS)]
        if f.ask("v2", "yes_no", "Is it a Stable Diffusion 2.x checkpoint?", False):
            argv.append("--v2")
    models: list[str] = []
    while True:
        chosen = set(models)
        models.append(f.ask("models", "path", f"Choose LoRA file {len(models) + 1}", path_kind="file",
                            filetypes=LORA_EXTS,
                            check=lambda p: "already chosen; pick another file" if p in chosen else None))
        if not f.ask("add_another", "yes_no", f"{len(models)} chosen. Add another LoRA?", False,
                     help="each LoRA gets its own strength on the next window"):
            break
    labels = tuple(f"{i + 1}. {os.path.basename(m)}" for i, m in enumerate(models))
    ratios = f.ask("ratios", "sliders", "Strength of each LoRA in the merge", [1.0] * len(models), options=labels,
                   low=RATIO_RANGE[0], high=RATIO_RANGE[1], step=0.05)
    argv += ["--models", *models, "--ratios", *map(number_text, ratios)]
    if into_model:
        default_name = os.path.splitext(argv[1])[0] + "-merged.safetensors"
        argv += f.ask_save_file("Save the merged checkpoint as", default_name, CHECKPOINT_EXTS)
    else:
        method = f.ask("merge_method", "choice", "How should they be merged?", "svd", options=("svd", "concat"),
                       labels={"svd": "into a new rank (SVD): a smaller file, close to the sum",
                               "concat": "exactly: the ranks add up (a bigger file)"},
                       help="SVD keeps the strongest directions of the sum; concat keeps everything")
        if method == "svd":
            rank = f.ask("new_rank", "number", "Rank of the merged LoRA", 32, integer=True, low=1)
            argv += ["--new_rank", str(rank)]
        else:
            argv.append("--concat")
        default_name = os.path.join(os.path.dirname(models[0]), "merged.safetensors")
        argv += f.ask_save_file("Save the merged LoRA as", default_name, (".safetensors", ".ckpt", ".pt"))
    argv += f.ask_precision()
    argv += f.ask_device()
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/lora_merge.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
