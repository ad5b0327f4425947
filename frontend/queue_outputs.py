"""Where each queue job writes, and the checks that no job overwrites another's files.

A job writes ``<output_folder>/<output_name>.<save_as>`` and, beside it, kohya's per-epoch and
per-step files (``name-000002.safetensors``, ``name-step00000500.safetensors``,
``name-interrupted.safetensors``) and state folders (``name-state``, ``name-000002-state``,
``name-step00000500-state``). Two jobs with the same output name in the same folder would overwrite
each other, and so would a job whose files are already there from an earlier training: the queue
refuses both before the job runs, with the fix in the message. Names are compared without regard
to case (Windows and macOS folders do not tell them apart).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sd_scripts.core.errors import ConfigError

__all__ = ["OutputTarget", "target_of", "existing_outputs", "clash_error", "overwrite_error"]


@dataclass(frozen=True)
class OutputTarget:
    folder: str  # absolute
    name: str  # the output name (file name without extension)
    ext: str  # safetensors, ckpt, ...

    @property
    def key(self) -> tuple[str, str]:
        return os.path.normcase(os.path.normpath(self.folder)).casefold(), self.name.casefold()

    @property
    def lora_path(self) -> str:
        return os.path.join(self.folder, f"{self.name}.{self.ext}")


def target_of(store) -> OutputTarget:
    """The output folder, name and extension a checked ArgStore trains into (as settings_map maps them)."""
    from .settings_map import output_name_of

    return OutputTarget(os.path.abspath(store.output_folder or "."), output_name_of(store),
                        (store.save_as or "safetensors").lstrip("."))


def existing_outputs(target: OutputTarget) -> list[str]:
    """Files and state folders of ``target`` already in its output folder."""
    name, ext = re.escape(target.name), re.escape(target.ext)
    files = re.compile(rf"{name}(-\d{{6}}|-step\d{{8}}|-interrupted)?\.{ext}", re.IGNORECASE)
    states = re.compile(rf"{name}(-\d{{6}}|-step\d{{8}})?-state", re.IGNORECASE)
    try:
        entries = sorted(os.scandir(target.folder), key=lambda e: e.name)
    except OSError:
        return []
    return [entry.path for entry in entries
            if (files.fullmatch(entry.name) and entry.is_file()) or (states.fullmatch(entry.name) and entry.is_dir())]


def clash_error(job: str, target: OutputTarget, other: str) -> ConfigError:
    return ConfigError(f"change_output_name: {job} and {other} both write '{target.name}' into {target.folder}, so one "
                       f"would overwrite the other; give one of them another change_output_name (or output_folder)",
                       setting="change_output_name")


def overwrite_error(job: str, target: OutputTarget, existing: list[str]) -> ConfigError:
    more = f" (and {len(existing) - 1} more of its files)" if len(existing) > 1 else ""
    return ConfigError(f"change_output_name: {job} would overwrite {existing[0]}{more}, which is already there; give "
                       f"the job another change_output_name, or move the old files out of {target.folder}",
                       setting="change_output_name")
