"""Popup for ``scripts/tag_images.py``: tag a folder of images with a WD14 tagger.

The folder (and whether its subfolders count), the tagger, the two thresholds, trigger words,
underscores, what to do with captions that already exist, and a dry run.
"""

from __future__ import annotations

import os

from sd_scripts.data.wd14_tagger import DEFAULT_REPO

from ._tool_flow import ToolFlow, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments", "TAGGERS"]

TOOL = "tag_images"
TAGGERS = (
    DEFAULT_REPO,
    "SmilingWolf/wd-vit-tagger-v3",
    "SmilingWolf/wd-convnext-tagger-v3",
    "SmilingWolf/wd-vit-large-tagger-v3",
    "SmilingWolf/wd-eva02-large-tagger-v3",
    "SmilingWolf/wd-v1-4-moat-tagger-v2",
    "SmilingWolf/wd-v1-4-convnext-tagger-v2",
)
_OTHER, _FOLDER = "other", "folder"
_TAGGER_LABELS = {
    TAGGERS[0]: "WD SwinV2 v3 (recommended)",
    TAGGERS[4]: "WD EVA02 large v3 (best, slower)",
    _OTHER: "another Hugging Face repo id",
    _FOLDER: "a folder on this computer (model.onnx + selected_tags.csv)",
}


def _image_files(folder: str, recursive: bool) -> list[str]:
    from sd_scripts.data.image_tagging import images_in

    return images_in(folder, recursive)


def _captioned(images: list[str], extension: str) -> int:
    return sum(os.path.isfile(os.path.splitext(i)[0] + extension) for i in images)


def _ask_model(f: ToolFlow) -> list[str]:
    choice = f.ask("repo_id", "choice", "Which tagger?", TAGGERS[0], options=(*TAGGERS, _OTHER, _FOLDER),
                   labels=_TAGGER_LABELS)
    if choice == _FOLDER:
        return ["--model_dir", f.ask("model_dir", "path", "Choose the tagger's folder", path_kind="dir",
                                     check=_check_model_dir)]
    if choice == _OTHER:
        choice = f.ask("other_repo", "text", "Hugging Face repo id of the tagger (owner/name)", None,
                       check=lambda t: None if t.count("/") == 1 else "write it as owner/name",
                       help=f.help.get("repo_id", ""))
    return ["--repo_id", choice]


def _check_model_dir(folder: str) -> str | None:
    missing = [n for n in ("model.onnx", "selected_tags.csv") if not os.path.isfile(os.path.join(folder, n))]
    return f"this folder has no {' and '.join(missing)}" if missing else None


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    folder = f.ask("train_data_dir", "path", "Choose the folder of images to tag", path_kind="dir",
                   check=lambda p: None if _image_files(p, True) else "no images in this folder or its subfolders")
    argv = [folder]
    recursive = not _image_files(folder, False)
    if not recursive:
        has_sub = len(_image_files(folder, True)) > len(_image_files(folder, False))
        recursive = has_sub and f.ask("recursive", "yes_no", "Also tag the images in its subfolders?", True)
    if recursive:
        argv.append("--recursive")
    argv += _ask_model(f)
    general = f.ask("general_threshold", "number", "Confidence a tag needs (general tags)", 0.35, low=0, high=1)
    character = f.ask("character_threshold", "number", "Confidence a character's name needs", 0.85, low=0, high=1)
    argv += ["--general_threshold", f"{general:g}", "--character_threshold", f"{character:g}"]
    trigger = f.ask("trigger_words", "text", "Trigger word(s) put first in every caption (optional)", None,
                    optional=True, none_label="none")
    if trigger:
        argv += ["--trigger_words", trigger]
    if f.ask("remove_underscore", "yes_no", "Write tags with spaces (long hair) instead of underscores (long_hair)?",
             True):
        argv.append("--remove_underscore")
    undesired = f.ask("undesired_tags", "text", "Tags never to write, comma-separated (optional)", None,
                      optional=True, none_label="none")
    if undesired:
        argv += ["--undesired_tags", undesired]
    images = _image_files(folder, recursive)
    existing = _captioned(images, ".txt")
    if existing:
        mode = f.ask("existing", "choice", f"{existing} of {len(images)} images already have a caption. Those captions:",
                     "skip", options=("skip", "append", "overwrite"),
                     labels={"skip": "keep them as they are (tag only the others)",
                             "append": "add the new tags after theirs", "overwrite": "replace them"},
                     help=f.help.get("append", ""))
        if mode != "skip":
            argv.append(f"--{mode}")
    if f.ask("dry_run", "yes_no", "Only show the captions (a dry run, nothing written)?", False):
        argv.append("--dry_run")
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/tag_images.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
