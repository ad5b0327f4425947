"""Bulk tag editing of a dataset's captions, with a backup of every caption changed and a way back.

* :class:`TagEdits` says what to do; :func:`edit_tags` does it to one list of tags, in this
  order: lower-case, underscores to spaces, replace, remove, trigger words to the front,
  deduplicate, sort (the first ``keep_tokens`` tags stay where they are).
* :func:`plan_edits` reads every caption of a dataset folder (recursively: each
  ``<repeats>_<name>`` subset and any other folder; only caption files that belong to an image)
  and returns the changes, without writing anything. Captions are UTF-8 (a file that is not is
  refused in one line before anything is written); each line of a caption is edited on its own,
  keeping its line ending, and a line whose tags do not change is kept byte for byte.
* :func:`apply_edits` first zips the captions it is about to change
  (``captions_backup_<time>.zip`` in the dataset folder, or another folder), then writes each
  one atomically. :func:`restore_backup` puts a backup's captions back (after backing up the
  captions it replaces, so a restore can be undone too).

Nothing here prints; the CLI (``scripts/edit_tags.py``) shows the diff.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass, field

from ..files.atomic import atomic_save_bytes, atomic_write
from ..core.errors import ConfigError, DatasetError
from .caption_files import check_caption_extension, read_caption_text
from .images import is_hidden_name, is_image_file
from .tag_text import TagMatcher, dedupe_tags, join_tags, split_tags, tag_key, underscores_to_spaces

__all__ = [
    "TagEdits",
    "edit_tags",
    "edit_caption",
    "CaptionChange",
    "EditPlan",
    "find_caption_files",
    "plan_edits",
    "apply_edits",
    "restore_backup",
    "RestoreResult",
    "BACKUP_PREFIX",
]

BACKUP_PREFIX = "captions_backup_"
_MANIFEST = "manifest.json"
_FILES = "captions/"


@dataclass(frozen=True)
class TagEdits:
    """The edits to make (every field off by default)."""

    trigger_words: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    dedupe: bool = False
    keep_tokens: int = 0
    sort: bool = False
    lowercase: bool = False
    remove_underscore: bool = False

    def __post_init__(self):
        if not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise ConfigError(f"keep_tokens: must be 0 or more, got {self.keep_tokens!r}", setting="keep_tokens")

    @property
    def empty(self) -> bool:
        return not (self.trigger_words or self.remove or self.replace or self.dedupe or self.sort or self.lowercase
                    or self.remove_underscore)


def _replace(tags: list[str], pairs: tuple[tuple[str, str], ...]) -> list[str]:
    table = {tag_key(source): split_tags(target) for source, target in pairs}
    out: list[str] = []
    for tag in tags:
        out.extend(table.get(tag_key(tag), [tag]))
    return out


def edit_tags(tags: list[str], edits: TagEdits) -> list[str]:
    """The tags after ``edits`` (see the module docstring for the order)."""
    out = list(tags)
    if edits.lowercase:
        out = [t.lower() for t in out]
    if edits.remove_underscore:
        out = [underscores_to_spaces(t) for t in out]
    if edits.replace:
        out = _replace(out, edits.replace)
    remove = TagMatcher(edits.remove)
    if remove:
        out = [t for t in out if not remove(t)]
    if edits.trigger_words:
        triggers = TagMatcher(edits.trigger_words)
        out = [*edits.trigger_words, *[t for t in out if not triggers(t)]]
    if edits.dedupe:
        out = dedupe_tags(out)
    if edits.sort:
        keep = edits.keep_tokens
        out = out[:keep] + sorted(out[keep:], key=lambda t: (tag_key(t), t))
    return out


def _split_ending(line: str) -> tuple[str, str]:
    for ending in ("\r\n", "\n", "\r"):
        if line.endswith(ending):
            return line[: -len(ending)], ending
    return line, ""


def edit_caption(text: str, edits: TagEdits) -> str:
    """``text`` with every non-empty line's tags edited; line endings and unchanged lines kept as they are."""
    out = []
    for line in text.splitlines(keepends=True):
        content, ending = _split_ending(line)
        tags = split_tags(content)
        if tags:
            new = edit_tags(tags, edits)
            if new != tags:
                content = join_tags(new)
        out.append(content + ending)
    return "".join(out)


@dataclass(frozen=True)
class CaptionChange:
    """One caption file that changes: its path relative to the dataset folder, and both texts."""

    path: str
    relative: str
    old: str
    new: str


@dataclass
class EditPlan:
    """What :func:`plan_edits` found in one dataset folder."""

    root: str
    changes: list[CaptionChange] = field(default_factory=list)
    captions: int = 0
    orphans: int = 0  # caption-extension files without an image beside them (left alone)


def _walk(root: str):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_hidden_name(d) and d != "__MACOSX")
        yield folder, sorted(f for f in files if not is_hidden_name(f))


def find_caption_files(root: str, caption_extension: str = ".txt") -> tuple[list[str], int]:
    """The caption files under ``root`` (recursively) that belong to an image, and how many
    other files have the caption extension."""
    ext = caption_extension.lower()
    found, orphans = [], 0
    for folder, files in _walk(root):
        image_stems = {os.path.splitext(f)[0] for f in files if is_image_file(f)}
        for name in files:
            stem, this_ext = os.path.splitext(name)
            if this_ext.lower() != ext:
                continue
            if stem in image_stems:
                found.append(os.path.join(folder, name))
            else:
                orphans += 1
    return found, orphans


def check_dataset_folder(root: str, setting: str = "dataset") -> str:
    if not root:
        raise ConfigError(f"{setting}: missing; give the dataset folder (the one with your <repeats>_<name> folders)",
                          setting=setting)
    if not os.path.exists(root):
        raise DatasetError(f"{setting}: folder '{root}' does not exist; check the path", setting=setting)
    if not os.path.isdir(root):
        raise DatasetError(f"{setting}: '{root}' is a file, not a folder; give the dataset folder", setting=setting)
    return os.path.abspath(root)


_BOM = "\ufeff"


def plan_edits(root: str, edits: TagEdits, caption_extension: str = ".txt", setting: str = "dataset") -> EditPlan:
    """Every caption under ``root`` that ``edits`` would change; writes nothing."""
    root = check_dataset_folder(root, setting)
    check_caption_extension(caption_extension)
    paths, orphans = find_caption_files(root, caption_extension)
    plan = EditPlan(root=root, captions=len(paths), orphans=orphans)
    for path in paths:
        old = read_caption_text(path, setting)
        bom = _BOM if old.startswith(_BOM) else ""
        new = bom + edit_caption(old[len(bom):], edits)
        if new != old:
            plan.changes.append(CaptionChange(path, os.path.relpath(path, root).replace(os.sep, "/"), old, new))
    return plan


def _backup_path(folder: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(folder, f"{BACKUP_PREFIX}{stamp}.zip")
    n = 2
    while os.path.exists(path):
        path = os.path.join(folder, f"{BACKUP_PREFIX}{stamp}_{n}.zip")
        n += 1
    return path


def _check_backup_dir(backup_dir: str | None, root: str) -> str:
    folder = backup_dir or root
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"backup_dir: '{folder}' is a file; give a folder for the backup zip", setting="backup_dir")
    return folder


def write_backup(root: str, files: dict[str, bytes], backup_dir: str | None = None, note: str = "edit_tags") -> str:
    """Zip ``{relative path: bytes}`` with a manifest naming ``root``; returns the zip's path."""
    folder = _check_backup_dir(backup_dir, root)
    os.makedirs(folder, exist_ok=True)
    path = _backup_path(folder)
    manifest = {"root": root, "tool": note, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "files": sorted(files)}
    with atomic_write(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(_MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
            for relative, data in sorted(files.items()):
                archive.writestr(_FILES + relative, data)
    return path


def apply_edits(plan: EditPlan, backup_dir: str | None = None) -> str | None:
    """Back up the captions ``plan`` changes, then write the new ones; returns the backup's path
    (None when nothing changes)."""
    if not plan.changes:
        return None
    _check_backup_dir(backup_dir, plan.root)
    originals = {}
    for change in plan.changes:
        with open(change.path, "rb") as f:
            originals[change.relative] = f.read()
        if originals[change.relative] != change.old.encode("utf-8"):
            raise DatasetError(f"dataset: caption file '{change.path}' changed while edit_tags was reading the "
                               "dataset; run it again (nothing was changed)", setting="dataset")
    backup = write_backup(plan.root, originals, backup_dir)
    for change in plan.changes:
        atomic_save_bytes(change.path, change.new.encode("utf-8"))
    return backup


@dataclass(frozen=True)
class RestoreResult:
    root: str
    restored: list[str]
    unchanged: int  # captions that already matched the backup
    backup_of_current: str | None


def _read_backup(zip_path: str) -> tuple[dict, dict[str, bytes]]:
    if not zip_path or not os.path.isfile(zip_path):
        raise ConfigError(f"restore: '{zip_path}' does not exist or is not a file; give a {BACKUP_PREFIX}<time>.zip "
                          "made by edit_tags", setting="restore")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            manifest = json.loads(archive.read(_MANIFEST).decode("utf-8"))
            files = {name[len(_FILES):]: archive.read(name) for name in archive.namelist()
                     if name.startswith(_FILES) and not name.endswith("/")}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise ConfigError(f"restore: '{zip_path}' is not a caption backup made by edit_tags (no readable "
                          f"{_MANIFEST}); give a {BACKUP_PREFIX}<time>.zip", setting="restore") from None
    for relative in files:
        parts = relative.split("/")
        if relative.startswith("/") or ".." in parts or ":" in parts[0]:
            raise ConfigError(f"restore: '{zip_path}' holds a path outside the dataset folder ({relative!r}); "
                              "it was not made by edit_tags", setting="restore")
    return manifest, files


def restore_backup(zip_path: str, root: str | None = None, backup_dir: str | None = None) -> RestoreResult:
    """Write a backup's captions back into ``root`` (default: the folder it was made from)."""
    manifest, files = _read_backup(zip_path)
    target = check_dataset_folder(root or manifest.get("root", ""), "dataset")
    current = {}
    for relative in files:
        path = os.path.join(target, *relative.split("/"))
        if os.path.isfile(path):
            with open(path, "rb") as f:
                current[relative] = f.read()
    changed = {rel: data for rel, data in files.items() if current.get(rel) != data}
    backup_of_current = None
    if changed and any(rel in current for rel in changed):
        backup_of_current = write_backup(target, {rel: current[rel] for rel in changed if rel in current}, backup_dir,
                                         note="edit_tags --restore")
    for relative, data in sorted(changed.items()):
        atomic_save_bytes(os.path.join(target, *relative.split("/")), data)
    return RestoreResult(target, sorted(changed), len(files) - len(changed), backup_of_current)
