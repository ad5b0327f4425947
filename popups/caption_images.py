"""Popup for ``scripts/caption_images.py``: natural-language captions for a folder of images.

The folder (and whether its subfolders count), the model, its prompt, trigger words, what to do with captions that
already exist, where the model runs, and a dry run.
"""

from __future__ import annotations

import os

from ._tool_flow import ToolFlow, _cuda_available, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments", "MODELS"]

TOOL = "caption_images"
MODELS = (
    "florence-community/Florence-2-large",
    "florence-community/Florence-2-base",
    "Salesforce/blip-image-captioning-large",
    "HuggingFaceTB/SmolVLM-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "fancyfeast/llama-joycaption-beta-one-hf-llava",
)
_OTHER, _FOLDER = "other", "folder"
_MODEL_LABELS = {
    MODELS[0]: "Florence-2 large: detailed captions, about 2 GB of VRAM (recommended; runs on a CPU too)",
    MODELS[1]: "Florence-2 base: faster, a little less detail",
    MODELS[2]: "BLIP large: one short sentence",
    MODELS[3]: "SmolVLM (2B): follows your instructions, about 5 GB of VRAM",
    MODELS[4]: "Qwen2.5-VL 3B: follows your instructions, about 8 GB of VRAM",
    MODELS[5]: "JoyCaption beta one (8B): the most detailed, 16 GB of VRAM or more",
    _OTHER: "another Hugging Face repo id",
    _FOLDER: "a model folder on this computer",
}
_FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
_TASK_LABELS = {"<CAPTION>": "one sentence", "<DETAILED_CAPTION>": "a few sentences (recommended)",
                "<MORE_DETAILED_CAPTION>": "a whole paragraph"}


def _image_files(folder: str, recursive: bool) -> list[str]:
    from sd_scripts.data.image_tagging import images_in

    return images_in(folder, recursive)


def _ask_model(f: ToolFlow) -> tuple[list[str], str]:
    """The model's arguments and what it is (the repo id or folder)."""
    choice = f.ask("model", "choice", "Which captioning model?", MODELS[0], options=(*MODELS, _OTHER, _FOLDER),
                   labels=_MODEL_LABELS)
    if choice == _FOLDER:
        choice = f.ask("model_dir", "path", "Choose the model's folder (config.json and the weights)", path_kind="dir",
                       check=lambda p: None if os.path.isfile(os.path.join(p, "config.json")) else
                       "this folder has no config.json", help=f.help.get("model", ""))
    elif choice == _OTHER:
        choice = f.ask("other_model", "text", "Hugging Face repo id of the model (owner/name)", None,
                       check=lambda t: None if t.count("/") == 1 else "write it as owner/name",
                       help=f.help.get("model", ""))
    return ["--model", choice], choice


def _ask_prompt(f: ToolFlow, model: str) -> list[str]:
    from sd_scripts.data.caption_model import DEFAULT_PROMPTS

    name = model.lower()
    if "florence" in name:
        task = f.ask("prompt", "choice", "How long should the captions be?", "<DETAILED_CAPTION>",
                     options=_FLORENCE_TASKS, labels=_TASK_LABELS)
        return ["--prompt", task]
    if "blip" in name:
        return []
    prompt = f.ask("prompt", "text", "What should the model be asked for each image?", DEFAULT_PROMPTS["chat"])
    return ["--prompt", prompt]


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    folder = f.ask("train_data_dir", "path", "Choose the folder of images to caption", path_kind="dir",
                   check=lambda p: None if _image_files(p, True) else "no images in this folder or its subfolders")
    argv = [folder]
    recursive = not _image_files(folder, False)
    if not recursive:
        has_sub = len(_image_files(folder, True)) > len(_image_files(folder, False))
        recursive = has_sub and f.ask("recursive", "yes_no", "Also caption the images in its subfolders?", True)
    if recursive:
        argv.append("--recursive")
    model_args, model = _ask_model(f)
    argv += model_args + _ask_prompt(f, model)
    trigger = f.ask("trigger_words", "text", "Trigger word(s) put first in every caption (optional)", None,
                    optional=True, none_label="none")
    if trigger:
        argv += ["--trigger_words", trigger]
    images = _image_files(folder, recursive)
    existing = sum(os.path.isfile(os.path.splitext(i)[0] + ".txt") for i in images)
    if existing:
        mode = f.ask("existing", "choice", f"{existing} of {len(images)} images already have a caption. Those captions:",
                     "skip", options=("skip", "append", "overwrite"),
                     labels={"skip": "keep them as they are (caption only the others)",
                             "append": "add the new caption after theirs", "overwrite": "replace them"},
                     help=f.help.get("append", ""))
        if mode != "skip":
            argv.append(f"--{mode}")
    if _cuda_available():
        device = f.ask("device", "choice", "Where should the model run?", "cuda", options=("cuda", "cpu"),
                       labels={"cuda": "GPU (CUDA)", "cpu": "CPU (slow)"})
        argv += ["--device", device]
    if f.ask("dry_run", "yes_no", "Only show the captions (a dry run, nothing written)?", False):
        argv.append("--dry_run")
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/caption_images.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
