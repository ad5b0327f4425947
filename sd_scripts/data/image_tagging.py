"""Tagging a dataset's images with a WD14 tagger: which images, which captions are written, in batches.

* :func:`find_images`: the images of a folder (``recursive``: and of every subfolder); one line
  naming the setting when the folder is missing or holds no images.
* :func:`plan_captions`: ``<image stem><caption_extension>`` beside each image and what happens
  to it. An existing caption (not empty) is kept unless the mode is ``append`` (its tags come
  first, the new ones not already there follow) or ``overwrite``. Captions to append to are read
  (UTF-8) before anything is written, so a bad one stops the run with nothing written. An image
  listed twice (a folder given twice) is tagged once.
* :func:`tag_captions`: loads and prepares images on worker threads while the model runs, chooses
  the tags (:mod:`.tag_selection`), writes each caption atomically (or only reports it in a dry
  run) and counts the tags. Images are never written to; an image that cannot be decoded is
  reported and skipped.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..files.atomic import atomic_save_text
from ..core.errors import ConfigError, DatasetError
from .images import IMAGE_EXTENSIONS, ImageProblem, is_hidden_name, is_image_file, load_image
from .caption_files import check_caption_extension, has_caption, read_caption_text
from .tag_selection import TagSettings, TagVocabulary, choose_tags
from .tag_text import join_tags, split_tags, tag_key
from .wd14_tagger import WD14Tagger, prepare_image

__all__ = ["WRITE_MODES", "images_in", "CaptionJob", "TaggingResult", "find_images", "plan_captions", "tag_captions",
           "append_tags"]

WRITE_MODES = ("skip", "append", "overwrite")


def images_in(folder: str, recursive: bool) -> list[str]:
    """The images directly in ``folder`` (``recursive``: also in its subfolders, hidden ones left out), sorted."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden_name(d) and d != "__MACOSX")
        found += [os.path.join(here, f) for f in sorted(files) if is_image_file(f)]
        if not recursive:
            break
    return found


def find_images(folder: str, recursive: bool = False, setting: str = "train_data_dir") -> list[str]:
    """The images of ``folder`` (and its subfolders when ``recursive``), sorted."""
    if not folder:
        raise ConfigError(f"{setting}: missing; give the folder of images to tag", setting=setting)
    if not os.path.exists(folder):
        raise DatasetError(f"{setting}: folder '{folder}' does not exist; check the path", setting=setting)
    if not os.path.isdir(folder):
        raise DatasetError(f"{setting}: '{folder}' is a file, not a folder; give the folder of images", setting=setting)
    images = images_in(folder, recursive)
    if images:
        return images
    if not recursive and images_in(folder, True):
        raise DatasetError(f"{setting}: no images directly in '{folder}', but its subfolders have some; add "
                           "--recursive to tag them", setting=setting)
    raise DatasetError(f"{setting}: no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'"
                       f"{' or its subfolders' if recursive else ''}; check the folder", setting=setting)


@dataclass(frozen=True)
class CaptionJob:
    """One image to tag: its caption file and, when appending, the caption's present text."""

    image: str
    caption: str
    existing: str | None = None


def plan_captions(images: list[str], caption_extension: str, mode: str) -> tuple[list[CaptionJob], list[str]]:
    """``(jobs, images skipped because a caption exists)``; reads the captions ``append`` adds to."""
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {WRITE_MODES}")
    check_caption_extension(caption_extension)
    jobs, kept = [], []
    for image in dict.fromkeys(os.path.abspath(i) for i in images):  # a folder listed twice is tagged once
        caption = os.path.splitext(image)[0] + caption_extension
        if mode != "overwrite" and has_caption(caption):
            if mode == "skip":
                kept.append(image)
                continue
            jobs.append(CaptionJob(image, caption, read_caption_text(caption, "caption_extension")))
        else:
            jobs.append(CaptionJob(image, caption))
    return jobs, kept


def append_tags(existing: str, tags: list[str], trigger_words: tuple[str, ...] = (), separator: str = ", ") -> str:
    """``existing``'s first line with ``tags`` it lacks added after its own (trigger words first);
    its other lines and line endings stay as they are."""
    lines = existing.lstrip("\ufeff").splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.strip())
    content = lines[first].rstrip("\r\n")
    ending = lines[first][len(content):]
    old = split_tags(content, separator)
    merged, seen = [], set()
    for tag in [*trigger_words, *old, *tags]:
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            merged.append(tag)
    lines[first] = join_tags(merged, separator) + ending
    return ("\ufeff" if existing.startswith("\ufeff") else "") + "".join(lines)


@dataclass
class TaggingResult:
    written: list[str] = field(default_factory=list)  # caption files written (or that would be, in a dry run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    frequency: Counter = field(default_factory=Counter)


def _load(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare_image(load_image(path), size), None
    except ImageProblem as e:
        return None, str(e)


def _prepared_batches(jobs: list[CaptionJob], size: int, batch_size: int, workers: int):
    """``(jobs, [(array or None, problem)])`` per batch; the next batch loads while this one runs."""
    chunks = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(_load, j.image, size) for j in chunks[0]] if chunks else []
        for number, chunk in enumerate(chunks):
            current = pending
            if number + 1 < len(chunks):
                pending = [pool.submit(_load, j.image, size) for j in chunks[number + 1]]
            yield chunk, [f.result() for f in current]


OnCaption = Callable[[CaptionJob, str, list[tuple[str, float | None]]], None]


def tag_captions(tagger: WD14Tagger, settings: TagSettings, jobs: list[CaptionJob], *, batch_size: int = 4,
                 workers: int = 2, separator: str = ", ", dry_run: bool = False, on_caption: OnCaption | None = None,
                 progress: Callable[[int], None] | None = None) -> TaggingResult:
    """Tag every job's image and write its caption (nothing in a dry run); see the module docstring."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be 1 or more, got {batch_size!r}", setting="batch_size")
    vocab = TagVocabulary(tagger.labels, settings)
    result = TaggingResult()
    for chunk, loaded in _prepared_batches(jobs, tagger.size, batch_size, workers):
        good = [(job, array) for job, (array, _) in zip(chunk, loaded) if array is not None]
        result.failed += [(job.image, problem) for job, (array, problem) in zip(chunk, loaded) if array is None]
        probs = tagger.probabilities(np.stack([a for _, a in good])) if good else []
        for (job, _), row in zip(good, probs):
            chosen = choose_tags(row, vocab, settings)
            tags = [t for t, _ in chosen]
            if job.existing is not None:
                text = append_tags(job.existing, tags, settings.trigger_words, separator)
            else:
                text = join_tags(tags, separator) + "\n"
            if not dry_run:
                atomic_save_text(job.caption, text)
            result.written.append(job.caption)
            result.frequency.update(tags)
            if on_caption:
                on_caption(job, text, chosen)
        if progress:
            progress(len(chunk))
    return result
