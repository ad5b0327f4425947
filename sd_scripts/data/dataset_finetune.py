"""kohya's fine-tuning datasets: a metadata file and a folder of images.

kohya's ``finetune/`` scripts (``merge_captions_to_metadata.py``, ``merge_dd_tags_to_metadata.py``,
``prepare_buckets_latents.py``) write a JSON object ``{image_key: {"caption": ..., "tags": ...,
"train_resolution": [w, h], ...}}``; ``.jsonl`` files hold one ``{"image_path": ..., "caption": ...,
"tags": ...}`` object a line. It is given as ``in_json`` (with ``train_data_dir`` as the image folder)
or as a ``[[datasets.subsets]]`` ``metadata_file`` (with an optional ``image_dir``).

As in kohya: an entry's image is the key itself when that file exists (an absolute path, or a path
relative to the working folder), else ``<image_dir>/<key>`` or ``<image_dir>/<key><ext>`` for the image
extensions; an entry without an image is an error. The caption is the entry's ``caption`` joined to its
``tags`` with ``caption_separator`` (with ``enable_wildcard``: the tags after every caption line), or
the tags alone; caption files are not read. ``train_resolution``/``image_size`` and kohya's ``.npz``
latents are not read: sizes come from the images, latents from this trainer's own cache. Nothing is
ever written here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from sd_scripts.core.errors import DatasetError
from sd_scripts.core.problems import Problems
from sd_scripts.data.images import IMAGE_EXTENSIONS

__all__ = ["MetadataEntry", "entry_caption", "read_metadata_subset"]

_MAX_LISTED = 5


@dataclass
class MetadataEntry:
    """One usable entry: the image found for ``key``, its caption and its tags (for tag frequency)."""

    key: str
    path: str
    caption: str
    tags: str | None


def _load(path: str, prefix: str, setting: str) -> dict:
    """The metadata as ``{key: entry}``; one-line DatasetError naming the file (and the position) otherwise."""
    if not os.path.exists(path):
        raise DatasetError(f"{prefix}: file '{path}' does not exist; check the path", setting)
    if os.path.isdir(path):
        raise DatasetError(f"{prefix}: '{path}' is a folder; give the metadata .json file", setting)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{prefix}: cannot read '{path}' ({e.strerror}); check its permissions", setting) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{prefix}: '{path}' is not UTF-8 text (byte {data[e.start]:#04x} at position {e.start}); "
                           f"save it as UTF-8", setting) from None
    if path.lower().endswith(".jsonl"):
        return _load_jsonl(text, path, prefix, setting)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{prefix}: '{path}' is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"fix the file or write it again with kohya's finetune scripts", setting) from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{prefix}: '{path}' must hold a JSON object {{image key: {{\"caption\": ..., \"tags\": "
                           f"...}}}}, found a {type(doc).__name__}", setting)
    return doc


def _load_jsonl(text: str, path: str, prefix: str, setting: str) -> dict:
    doc: dict = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{prefix}: line {number} of '{path}' is not valid JSON ({e.msg} at column {e.colno}); "
                               f"fix the line", setting) from None
        if not isinstance(item, dict) or not isinstance(item.get("image_path"), str):
            raise DatasetError(f"{prefix}: line {number} of '{path}' must be an object with \"image_path\" and "
                               f"\"caption\" or \"tags\"", setting)
        doc[item["image_path"]] = {k: item[k] for k in ("caption", "tags") if k in item}
    return doc


def _find_image(key: str, image_dir: str | None) -> str | None:
    """kohya's lookup: the key as a path, else ``<image_dir>/<key>``, else ``<image_dir>/<key><ext>``."""
    if key and os.path.isfile(key):
        return key
    if not image_dir or not key:
        return None
    candidate = os.path.join(image_dir, key)
    if os.path.isfile(candidate):
        return candidate
    found = sorted(candidate + ext for ext in {e for x in IMAGE_EXTENSIONS for e in (x, x.upper())}
                   if os.path.isfile(candidate + ext))
    return found[0] if found else None


def _entry_text(key: str, entry: object, path: str, prefix: str, setting: str) -> tuple[str | None, str | None]:
    bad = DatasetError(f"{prefix}: entry '{key}' of '{path}' must be an object whose \"caption\" and \"tags\" are "
                       f"text, got {str(entry)[:60]!r}", setting)
    if not isinstance(entry, dict):
        raise bad
    caption, tags = entry.get("caption"), entry.get("tags")
    if not isinstance(caption, (str, type(None))) or not isinstance(tags, (str, type(None))):
        raise bad
    return caption, tags


def entry_caption(caption: str | None, tags: str | None, separator: str, wildcard: bool) -> tuple[str, str | None]:
    """kohya's caption of one entry and the tags it counts: caption + separator + tags, or the tags alone."""
    if caption is None:
        return tags or "", tags
    if tags is None or not tags:
        return caption, tags
    if wildcard:
        tags_line = tags.replace("\n", separator)
        lines = [line for line in caption.split("\n") if line.strip()]
        return "\n".join(f"{line}{separator}{tags_line}" for line in lines) or tags_line, tags
    return caption + separator + tags, tags


def read_metadata_subset(metadata_file: str, image_dir: str | None, *, prefix: str, setting: str, separator: str,
                         wildcard: bool, problems: Problems) -> list[MetadataEntry]:
    """The usable entries of one metadata file, in file order.

    ``prefix`` starts every message (e.g. ``"in_json"``); an empty file is a warning (the subset has no
    images); an entry without an image, a malformed file or entry is a one-line DatasetError."""
    doc = _load(metadata_file, prefix, setting)
    if not doc:
        problems.warn(f"{prefix}: '{metadata_file}' has no image entries; it is skipped")
        return []
    entries: list[MetadataEntry] = []
    missing: list[str] = []
    for key, value in doc.items():
        caption, tags = _entry_text(key, value, metadata_file, prefix, setting)
        found = _find_image(key, image_dir)
        if found is None:
            missing.append(key)
            continue
        text, counted = entry_caption(caption, tags, separator, wildcard)
        entries.append(MetadataEntry(key=key, path=found, caption=text, tags=counted))
    if missing:
        raise DatasetError(_missing_message(missing, len(doc), metadata_file, image_dir, prefix), setting)
    return entries


def _missing_message(missing: list[str], total: int, metadata_file: str, image_dir: str | None, prefix: str) -> str:
    shown = ", ".join(f"'{k}'" for k in missing[:_MAX_LISTED])
    if len(missing) > _MAX_LISTED:
        shown += f" and {len(missing) - _MAX_LISTED} more"
    where = f"in '{image_dir}'" if image_dir else "(no image folder given)"
    npz = image_dir and any(os.path.isfile(os.path.join(image_dir, k + ".npz")) for k in missing[:_MAX_LISTED])
    hint = ("only kohya's .npz latents are there, and this trainer needs the images; put the images back" if npz
            else "give the images' folder as image_dir (train_data_dir with in_json) or fix the keys")
    return (f"{prefix}: no image found for {len(missing)} of {total} entries of '{metadata_file}' ({shown}) "
            f"{where}: looked for the key as a path and for <key>{'/'.join(IMAGE_EXTENSIONS)}; {hint}")
