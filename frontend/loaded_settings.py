"""What one settings file sets, converted to ArgStore names and types (shared by the JSON and kohya_ss readers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.problems import Problems

from .fields import SettingInfo, coerce

__all__ = ["LoadedSettings", "coerce_file_values"]


@dataclass
class LoadedSettings:
    """What one settings file sets, already converted to ArgStore names and types."""

    path: str
    fmt: str  # "lets" (ours and the 2023 tool's) or "kohya_ss"
    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip_list: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        """One line listing every key that had no use, or None."""
        if not self.ignored:
            return None
        return f"{os.path.basename(self.path)}: ignored settings this trainer does not use: " + ", ".join(self.ignored)


def coerce_file_values(
    raw: dict[str, tuple[Any, str]], infos: dict[str, SettingInfo], file_name: str, problems: Problems
) -> dict[str, Any]:
    """Convert ``{setting: (value, key as written in the file)}``; record one error per bad value in ``problems``."""
    values: dict[str, Any] = {}
    for name, (value, key) in raw.items():
        info = infos[name]
        if isinstance(value, str) and value.strip() == "":
            continue  # "" means "not set" in every format we read
        try:
            values[name] = coerce(info, value)
        except ValueError as err:
            label = key if key == name else f"{key} (-> {name})"
            problems.error(name, str(err), named=label, where=file_name)
    return values
