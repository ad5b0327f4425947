"""Preflight checks of the paths the settings name: the output folder and file name (can they be written?), the
input files and folders (do they exist, can they be read?) and the output folder's place (not inside the
dataset). Only the file system is asked; no file is read."""

from __future__ import annotations

import os

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems

__all__ = ["check_output", "check_input_paths", "check_output_outside_dataset", "existing_ancestor"]

# Reserved device names on Windows: "con.safetensors" cannot be created there.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_NAME_CHARS = '/\\:*?"<>|'
# input settings that name a file ("file") or a file or folder ("any")
_INPUTS = (("network_weights", "file"), ("vae", "any"), ("dataset_config", "file"), ("sample_prompts", "file"))


def existing_ancestor(path: str) -> str | None:
    """``path`` itself or its nearest existing parent folder."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return current


def check_output(config, problems: Problems) -> None:
    """``output_dir`` can be created and written; ``output_name`` is a file name every system can keep."""
    out = config.output_dir
    if not out:
        problems.error("output_dir", "not set; give the folder where the LoRA should be saved")
    elif os.path.exists(out) and not os.path.isdir(out):
        problems.error("output_dir", f"{out} is a file, not a folder; give a folder (it is created if missing)")
    else:
        parent = existing_ancestor(out)
        if parent is None or not os.path.isdir(parent):
            problems.error("output_dir", f"{out} cannot be created: {parent or 'its parent'} is not a folder")
        elif not os.access(parent, os.W_OK | os.X_OK):
            problems.error("output_dir", f"{out} cannot be written ({parent} is read-only for this user); choose "
                           "another folder")
    name = config.output_name
    if name is None:
        return
    if not str(name).strip():
        problems.error("output_name", "is empty; give a file name without extension, e.g. my_lora")
    elif any(c in name for c in _BAD_NAME_CHARS) or any(ord(c) < 32 for c in name):
        problems.error("output_name", f"{name!r} contains characters not allowed in file names ({_BAD_NAME_CHARS}); "
                       "use letters, digits, - and _")
    elif name.rstrip(" .") != name:
        problems.error("output_name", f"{name!r} ends with a space or a dot, which Windows cannot keep; remove it")
    elif name.split(".")[0].lower() in _WINDOWS_RESERVED:
        problems.error("output_name", f"{name!r} is a reserved device name on Windows; choose another name")
    elif len(name.encode("utf-8")) > 200:
        problems.error("output_name", f"is {len(name.encode('utf-8'))} bytes long; use a name of at most 200 bytes")


def check_input_paths(config, problems: Problems) -> None:
    """The files and folders the settings read from exist and can be read."""
    for name, kind in _INPUTS:
        value = getattr(config, name)  # a setting named in _INPUTS
        if not value:
            continue
        if not os.path.exists(value):
            problems.error(name, f"not found: {value}; check the path")
        elif kind == "file" and not os.path.isfile(value):
            problems.error(name, f"{value} is a folder; give the file")
        elif not os.access(value, os.R_OK):
            problems.error(name, f"{value} cannot be read (permission denied); check its permissions")
    if config.resume and not os.path.isdir(config.resume):
        problems.error("resume", f"state folder not found: {config.resume}; give a folder saved with save_state")
    if config.logging_dir and os.path.exists(config.logging_dir) and not os.path.isdir(config.logging_dir):
        problems.error("logging_dir", f"{config.logging_dir} is a file, not a folder; give a folder for the logs")


def check_output_outside_dataset(config, dataset, problems: Problems) -> None:
    """The LoRA, its settings JSON and tag list must not land among the training images."""
    if dataset is None or not config.output_dir:
        return
    out = os.path.realpath(config.output_dir)
    folders = list(getattr(dataset, "roots", []) or []) + [s.image_dir for s in getattr(dataset, "subsets", []) or []]
    for folder in folders:
        root = os.path.realpath(folder)
        if out == root or out.startswith(root.rstrip(os.sep) + os.sep):
            problems.add(ConfigError(f"output_dir: {config.output_dir} is inside the dataset folder {folder}; the files "
                                     "written there would mix with your images; choose a folder outside the dataset",
                                     "output_dir"))
            return


