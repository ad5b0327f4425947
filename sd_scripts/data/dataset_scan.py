"""Finding a dataset's images and captions on disk, and checking each image once.

DreamBooth folders (``<repeats>_<class tokens>``), the caption file of each image (kohya's lookup: ``<stem><ext>``,
face-crop names, any case), fine-tuning subsets through :mod:`.dataset_finetune`, and :func:`probe_all`, which
decodes every image once to learn its size or why it cannot be used. Nothing here writes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from sd_scripts.core.errors import ConfigError, DatasetError
from sd_scripts.core.problems import Problems
from sd_scripts.data.dataset_finetune import read_metadata_subset
from sd_scripts.data.dataset_plan import SubsetSpec
from sd_scripts.data.images import (
    IMAGE_EXTENSIONS,
    ImageProblem,
    bomb_warnings_as_errors,
    is_hidden_name,
    is_image_file,
    probe_image,
)

__all__ = ["parse_folder_name", "check_root", "dreambooth_folders", "PendingImage", "scan_subset", "probe_all",
           "listing", "EXAMPLE", "MAX_LISTED"]

EXAMPLE = "e.g. 10_mychar"
MAX_LISTED = 5


def _q(path: str) -> str:
    return f"'{path}'"


def listing(names: list[str]) -> str:
    shown = ", ".join(_q(n) for n in names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        shown += f" and {len(names) - MAX_LISTED} more"
    return shown


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; ``None`` when the name does not start with a number."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest



# --------------------------------------------------------------------------- folders


def _folder_entries(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) directly inside ``folder``, hidden ones left out, sorted."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if is_hidden_name(entry.name) or entry.name == "__MACOSX":
                continue
            try:
                if entry.is_dir():
                    dirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
            except OSError:
                continue
    return sorted(dirs), sorted(files)


def check_root(root: str | None, setting: str) -> str:
    if not root:
        raise ConfigError(
            f"{setting}: not set; give the folder that holds your <repeats>_<name> image folders ({EXAMPLE}) or a dataset_config",
            setting,
        )
    if not os.path.exists(root):
        raise DatasetError(f"{setting}: folder '{root}' does not exist; check the path", setting)
    if not os.path.isdir(root):
        raise DatasetError(
            f"{setting}: '{root}' is a file, not a folder; give the folder that holds the <repeats>_<name> subfolders", setting
        )
    return root


def dreambooth_folders(root: str, setting: str, problems: Problems) -> list[tuple[str, int, str]]:
    """Valid ``<repeats>_<class tokens>`` subfolders of ``root`` as (path, repeats, class tokens)."""
    try:
        dirs, files = _folder_entries(root)
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read folder '{root}' ({e.strerror}); check its permissions", setting) from None
    loose_images = [f for f in files if is_image_file(f)]
    valid, invalid = [], []
    for name in dirs:
        parsed = parse_folder_name(name)
        if parsed is None or parsed[0] < 1:
            invalid.append(name)
        else:
            valid.append((os.path.join(root, name), parsed[0], parsed[1]))
    if not valid:
        if loose_images:
            raise DatasetError(
                f"{setting}: folder '{root}' has images directly inside but no <repeats>_<name> subfolders; "
                f"move them into a subfolder such as '{os.path.join(root, '10_mychar')}'",
                setting,
            )
        if invalid:
            raise DatasetError(
                f"{setting}: folder '{root}' has no <repeats>_<name> subfolders (found {listing(invalid)}); "
                f"rename them like 10_mychar (10 = repeats per epoch, at least 1)",
                setting,
            )
        if not files:
            raise DatasetError(
                f"{setting}: folder '{root}' is empty; put your images in a subfolder named <repeats>_<name> ({EXAMPLE})",
                setting,
            )
        raise DatasetError(
            f"{setting}: folder '{root}' has no <repeats>_<name> subfolders ({EXAMPLE}); put your images in such a folder",
            setting,
        )
    if invalid:
        problems.warn(
            f"{setting}: ignored subfolders not named <repeats>_<name> ({EXAMPLE}; repeats at least 1): {listing(invalid)}"
        )
    if loose_images:
        problems.warn(
            f"{setting}: {len(loose_images)} image(s) directly inside '{root}' are not used; only <repeats>_<name> subfolders are read"
        )
    return valid


# --------------------------------------------------------------------------- captions

_OTHER_CAPTION_EXTS = (".txt", ".caption", ".tags", ".cap")


def _read_caption(path: str, setting: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read caption file '{path}' ({e.strerror}); check its permissions", setting) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{setting}: caption file '{path}' is not UTF-8 text (byte {data[e.start]:#04x} at position {e.start}); "
            f"open it and save it as UTF-8",
            setting,
        ) from None


def _caption_text(raw: str, wildcard: bool) -> str:
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        return ""
    return "\n".join(lines) if wildcard else lines[0]


def _find_caption_file(folder: str, stem: str, ext: str, names: set[str], lower_names: dict[str, str]) -> str | None:
    candidates = [stem + ext]
    tokens = stem.split("_")
    if len(tokens) >= 5:  # kohya: "face crop" file names carry 4 extra _-separated numbers
        candidates.append("_".join(tokens[:-4]) + ext)
    for cand in candidates:
        if cand in names:
            return os.path.join(folder, cand)
    for cand in candidates:
        real = lower_names.get(cand.lower())
        if real is not None:
            return os.path.join(folder, real)
    return None


# --------------------------------------------------------------------------- scan


@dataclass
class PendingImage:
    path: str
    subset: int
    caption: str
    caption_source: str
    tags: str | None = None


def _scan_metadata_subset(subset: SubsetSpec, index: int, setting: str, problems: Problems,
                          roots: list[str]) -> list[PendingImage]:
    """A fine-tuning subset's images and captions from its metadata file; the images' folders join ``roots``."""
    prefix = "in_json" if setting == "in_json" else "dataset_config metadata_file"
    entries = read_metadata_subset(subset.metadata_file, subset.image_dir, prefix=prefix, setting=setting,
                                   separator=subset.captions.caption_separator,
                                   wildcard=subset.captions.enable_wildcard, problems=problems)
    pending = []
    known = {os.path.realpath(r) for r in roots}
    for entry in entries:
        folder = os.path.dirname(os.path.abspath(entry.path))
        if os.path.realpath(folder) not in known:  # never write among these images either
            known.add(os.path.realpath(folder))
            roots.append(folder)
        text = _caption_text(entry.caption, subset.captions.enable_wildcard)
        pending.append(PendingImage(entry.path, index, text, "metadata" if text else "none", entry.tags))
    uncaptioned = sum(1 for p in pending if not p.caption)
    if uncaptioned:
        problems.warn(f"{prefix}: {uncaptioned} of {len(pending)} entries of '{subset.metadata_file}' have no "
                        f"caption or tags; they train with an empty caption")
    return pending


def scan_subset(subset: SubsetSpec, index: int, setting: str, problems: Problems,
                unreadable: Problems | None = None, roots: list[str] | None = None) -> list[PendingImage]:
    """A subset's images with their captions (read now); warnings go to ``problems``, each caption file that
    cannot be read to ``unreadable`` (without it, the first one raises)."""
    if subset.metadata_file:
        return _scan_metadata_subset(subset, index, setting, problems, roots if roots is not None else [])
    folder = subset.image_dir
    try:
        dirs, files = _folder_entries(folder)
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read folder '{folder}' ({e.strerror}); check its permissions", setting) from None
    images = [f for f in files if is_image_file(f)]
    _warn_nested_images(folder, dirs, setting, problems)
    if not images:
        problems.warn(
            f"{setting}: folder '{folder}' has no images ({' '.join(IMAGE_EXTENSIONS)}); it is skipped"
        )
        return []
    names = set(files)
    lower_names = {}
    for n in files:
        lower_names.setdefault(n.lower(), n)
    ext = subset.caption_extension
    fallback = subset.class_tokens or ""
    pending = []
    empty_files, missing = [], []
    for name in images:
        stem = os.path.splitext(name)[0]
        cap_path = _find_caption_file(folder, stem, ext, names, lower_names)
        if cap_path is not None:
            try:
                raw = _read_caption(cap_path, setting)
            except DatasetError as e:
                if unreadable is None:
                    raise
                unreadable.add(e)
                continue
            text = _caption_text(raw, subset.captions.enable_wildcard)
            if text:
                pending.append(PendingImage(os.path.join(folder, name), index, text, "file"))
                continue
            empty_files.append(os.path.basename(cap_path))
        else:
            missing.append(name)
        pending.append(PendingImage(os.path.join(folder, name), index, fallback, "class_tokens" if fallback else "none"))
    use = f"the class tokens '{fallback}'" if fallback else "an empty caption"
    if empty_files:
        problems.warn(f"{setting}: {len(empty_files)} empty caption file(s) in '{folder}' ({listing(empty_files)}); those images use {use}")
    if missing and len(missing) < len(images):
        problems.warn(
            f"{setting}: {len(missing)} of {len(images)} images in '{folder}' have no {ext} caption ({listing(missing)}); they use {use}"
        )
    elif missing:
        others = sorted({os.path.splitext(f)[1].lower() for f in files
                         if os.path.splitext(f)[1].lower() in _OTHER_CAPTION_EXTS and os.path.splitext(f)[1].lower() != ext.lower()})
        if others:
            problems.warn(
                f"caption_extension: no {ext} captions in '{folder}' but there are {', '.join(others)} files; "
                f"set caption_extension to {others[0]} to use them"
            )
        elif not fallback:
            problems.warn(f"{setting}: images in '{folder}' have no captions and the folder name gives no class tokens; they train with an empty caption")
    return pending


def _warn_nested_images(folder: str, dirs: list[str], setting: str, problems: Problems) -> None:
    """Images in subfolders of a subset's folder are not read: say so."""
    nested = []
    for d in dirs:
        try:
            if any(is_image_file(n) for n in os.listdir(os.path.join(folder, d))):
                nested.append(d)
        except OSError:
            pass
    if nested:
        problems.warn(
            f"{setting}: images in subfolders of '{folder}' are not used (found {listing(nested)}); "
            f"make them <repeats>_<name> folders of their own"
        )


def probe_all(paths: list[str], progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[int, int] | str]:
    """Probe every image once (in a thread pool): its size, or the reason it cannot be used."""
    unique = list(dict.fromkeys(paths))

    def one(path: str) -> tuple[int, int] | str:
        try:
            return probe_image(path)
        except ImageProblem as e:
            return str(e)
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"

    results: dict[str, tuple[int, int] | str] = {}
    workers = max(1, min(8, (os.cpu_count() or 1), len(unique)))
    with bomb_warnings_as_errors():
        if workers == 1:
            outcomes = map(one, unique)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            outcomes = pool.map(one, unique)
        try:
            for i, (path, outcome) in enumerate(zip(unique, outcomes), 1):
                results[path] = outcome
                if progress is not None:
                    progress(i, len(unique))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
    return results
