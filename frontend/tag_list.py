"""The tag occurrence list: ``<output name>.txt`` beside the LoRA, one ``[count] tag`` per line.

The counts are the ones the engine stores in the LoRA's ``ss_tag_frequency`` metadata (per dataset
folder, tags in lower case), added up over all folders. Ties keep the order in which tags were first seen; the
alphabetical order compares tags without regard to case.
"""

from __future__ import annotations

import os

__all__ = ["merge_tag_counts", "read_caption_tags", "format_tag_list", "write_tag_list", "tag_list_path"]


def merge_tag_counts(tag_frequency: dict[str, dict[str, int]]) -> dict[str, int]:
    """``{folder: {tag: n}}`` -> ``{tag: total}``, in first-seen order."""
    totals: dict[str, int] = {}
    for counts in tag_frequency.values():
        for tag, count in counts.items():
            totals[tag] = totals.get(tag, 0) + int(count)
    return totals


def _split_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def read_caption_tags(img_folder: str, caption_extension: str = ".txt") -> dict[str, dict[str, int]]:
    """Count caption tags per ``<repeats>_<name>`` folder (UTF-8, split on commas, stripped, lower case).

    Used when the engine's dataset scan is not available; it reads folders and files in name order.
    """
    extension = caption_extension.lower() if caption_extension.startswith(".") else "." + caption_extension.lower()
    result: dict[str, dict[str, int]] = {}
    for entry in sorted(os.listdir(img_folder)):
        folder = os.path.join(img_folder, entry)
        if not os.path.isdir(folder) or entry.startswith("."):
            continue
        counts: dict[str, int] = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(".") or not name.lower().endswith(extension) or not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8-sig", errors="replace") as handle:
                for tag in _split_tags(handle.read().lower()):
                    counts[tag] = counts.get(tag, 0) + 1
        result[entry] = counts
    return result


def format_tag_list(counts: dict[str, int], model_name: str, alphabetical: bool = False) -> str:
    """The text of the tag list file."""
    if alphabetical:
        ordered = sorted(counts.items(), key=lambda item: (item[0].casefold(), item[0]))
        how = "alphabetically"
    else:
        # sorted() is stable, so tags with equal counts stay in first-seen order.
        ordered = sorted(counts.items(), key=lambda item: -item[1])
        how = "most used first"
    lines = [f"Tags in the captions used to train {model_name} ({len(ordered)} tags, {how}):"]
    lines += [f"[{count}] {tag}" for tag, count in ordered]
    return "\n".join(lines) + "\n"


def tag_list_path(output_folder: str, model_name: str) -> str:
    return os.path.join(output_folder, f"{model_name}.txt")


def write_tag_list(path: str, counts: dict[str, int], model_name: str, alphabetical: bool = False) -> str:
    """Write the list atomically (UTF-8); return its path."""
    text = format_tag_list(counts, model_name, alphabetical)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path
