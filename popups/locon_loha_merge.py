"""Popup for ``scripts/locon_loha_merge.py``: merge a LyCORIS (or LoRA) network into a checkpoint.

The 2023 flow (base, network, output, device, weight, dtype); the weight is any real number and
is always passed, and the dtype choice offers keeping each tensor's own precision.
"""

from __future__ import annotations

import os

from ._tool_flow import CHECKPOINT_EXTS, LORA_EXTS, PRECISIONS, ToolFlow, number_text, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments"]

TOOL = "locon_loha_merge"


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    base = f.ask("base", "path", "Choose the checkpoint to merge into", path_kind="file", filetypes=CHECKPOINT_EXTS)
    network = f.ask("lycoris", "path", "Choose the LyCORIS (LoCon, LoHa, LoKr, DoRA, OFT...) or LoRA file",
                    path_kind="file", filetypes=LORA_EXTS)
    weight = f.ask("weight", "number", "Strength of the network in the merge (1: as trained)", 1.0)
    argv = ["--base", base, "--lycoris", network, "--weight", number_text(weight)]
    dtype = f.ask("dtype", "choice", "Precision of the merged checkpoint", "keep", options=PRECISIONS,
                  labels={"keep": "keep each tensor's precision"})
    if dtype != "keep":
        argv += ["--dtype", dtype]
    name = f"{os.path.splitext(base)[0]}-{os.path.splitext(os.path.basename(network))[0]}.safetensors"
    argv += f.ask_save_file("Save the merged checkpoint as", name, CHECKPOINT_EXTS)
    argv += f.ask_device()
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/locon_loha_merge.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
