"""Writing natural-language captions for a dataset's images, with the tagger's rules for caption files.

Which images and which caption files are the tagger's (:mod:`.image_tagging`: ``find_images``, ``plan_captions``):
``<image stem><caption_extension>`` beside each image; an existing caption (not empty) is kept unless the mode is
``append`` (the new caption goes after its first line's text, joined by ``separator``, and the trigger words it
lacks in front) or ``overwrite``; images are
never written to; each caption file is written atomically, or only reported in a dry run.

The text written is ``trigger words, prefix caption suffix``: the trigger words first (comma-separated, as the
training's ``keep_tokens`` expects), then the prefix, the model's caption and the suffix, separated by spaces.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from sd_scripts.core.errors import ConfigError
from sd_scripts.files.atomic import atomic_save_text

from .images import ImageProblem, load_image
from .image_tagging import CaptionJob

__all__ = ["CaptionText", "CaptioningResult", "caption_text", "append_caption", "caption_images"]


@dataclass(frozen=True)
class CaptionText:
    """What is written around the model's caption."""

    trigger_words: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""
    separator: str = ", "  # between the trigger words and the caption, and when appending


def caption_text(caption: str, text: CaptionText) -> str:
    """``trigger words, prefix caption suffix`` (see the module docstring)."""
    body = " ".join(part.strip() for part in (text.prefix, caption, text.suffix) if part and part.strip())
    words = [w.strip() for w in text.trigger_words if w.strip()]
    return text.separator.join([*words, body] if body else words)


def append_caption(existing: str, caption: str, text: CaptionText = CaptionText()) -> str:
    """``existing`` with ``prefix caption suffix`` after its first non-empty line's text, and the trigger words that
    line lacks (as a comma-separated tag) in front of it; its other lines, its line endings and a byte-order mark
    stay as they are."""
    bom = "\ufeff" if existing.startswith("\ufeff") else ""
    lines = existing[len(bom):].splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.strip())
    content = lines[first].rstrip("\r\n")
    ending = lines[first][len(content):] or "\n"
    present = {tag.strip().lower() for tag in content.split(",")}
    missing = tuple(w for w in text.trigger_words if w.strip() and w.strip().lower() not in present)
    body = caption_text(caption, CaptionText(prefix=text.prefix, suffix=text.suffix))
    parts = [*(w.strip() for w in missing), content.strip(), body] if body else [*missing, content.strip()]
    lines[first] = text.separator.join(parts) + ending
    return bom + "".join(lines)


@dataclass
class CaptioningResult:
    written: list[str] = field(default_factory=list)  # caption files written (or that would be, in a dry run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


def _load(path: str):
    try:
        return load_image(path), None
    except ImageProblem as e:
        return None, str(e)


def caption_images(model, jobs: list[CaptionJob], text: CaptionText = CaptionText(), *, batch_size: int = 2,
                   dry_run: bool = False, on_caption: Callable[[CaptionJob, str], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> CaptioningResult:
    """Caption every job's image with ``model`` (a :class:`~.caption_model.CaptionModel`) in batches, the next batch
    decoding while this one runs, and write each caption file (nothing in a dry run)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be 1 or more, got {batch_size!r}", setting="batch_size")
    result = CaptioningResult()
    chunks = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_load, job.image) for job in chunks[0]] if chunks else []
        for number, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            if number + 1 < len(chunks):
                pending = [pool.submit(_load, job.image) for job in chunks[number + 1]]
            good = [(job, image) for job, (image, _) in zip(chunk, loaded) if image is not None]
            result.failed += [(job.image, problem) for job, (image, problem) in zip(chunk, loaded) if image is None]
            captions = model.caption([image for _, image in good]) if good else []
            for (job, _), caption in zip(good, captions):
                written = append_caption(job.existing, caption, text) if job.existing else caption_text(caption, text) + "\n"
                if not dry_run:
                    atomic_save_text(job.caption, written)
                result.written.append(job.caption)
                if on_caption:
                    on_caption(job, written)
            if progress:
                progress(len(chunk))
    return result
