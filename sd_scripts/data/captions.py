"""Caption processing, compatible with kohya-ss/sd-scripts (``process_caption``), and tag counting.

Every random choice is drawn from an explicit :class:`random.Random`, so a run is reproducible
from its seed. The order of the steps is kohya's:

1. ``caption_prefix`` / ``caption_suffix`` are added (they take part in shuffling);
2. the whole caption is dropped (``""``) with probability ``caption_dropout_rate``, or in every
   epoch that is a multiple of ``caption_dropout_every_n_epochs`` (epochs are 1-based);
3. otherwise: wildcards (``enable_wildcard``: a random line, then ``{a|b}`` choices) or the
   first line only;
4. when ``shuffle_caption``, ``token_warmup_step > 0`` or ``caption_tag_dropout_rate > 0``: the
   caption is split on ``caption_separator`` into fixed tags (the first ``keep_tokens``, or the
   parts around ``keep_tokens_separator``) and flexible tags; token warm-up keeps only the first
   flexible tags early in training; the flexible tags are shuffled, then each is dropped with
   probability ``caption_tag_dropout_rate``; the tags are joined with ``", "``;
5. ``secondary_separator`` is replaced by ``caption_separator``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["CaptionSettings", "process_caption", "warmup_steps", "count_tags", "split_tags"]


@dataclass(frozen=True)
class CaptionSettings:
    """The caption settings of one subset (kohya names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False

    @property
    def changes_captions(self) -> bool:
        """True when captions differ from step to step (matters for text-encoder caching)."""
        return bool(
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
            or self.token_warmup_step > 0
            or self.enable_wildcard
        )


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> int:
    """Token warm-up length in steps: ``token_warmup_step`` itself, or that fraction of ``max_train_steps`` if < 1."""
    if token_warmup_step < 1:
        return int(math.floor(token_warmup_step * max_train_steps))
    return int(token_warmup_step)


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


_WILDCARD = re.compile(r"\{([^{}]+)\}")


def _apply_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # "{{" and "}}" are literal braces
    open_mark, close_mark = "\x00<", ">\x00"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(
    caption: str,
    settings: CaptionSettings,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """Apply kohya's caption pipeline to one raw caption (see the module docstring).

    ``epoch`` is 1-based; ``step`` is the current optimizer step (for token warm-up) and
    ``max_train_steps`` the run's length (used when ``token_warmup_step < 1``).
    """
    s = settings
    if s.caption_prefix:
        caption = s.caption_prefix + " " + caption
    if s.caption_suffix:
        caption = caption + " " + s.caption_suffix

    drop = s.caption_dropout_rate > 0 and rng.random() < s.caption_dropout_rate
    if not drop and s.caption_dropout_every_n_epochs > 0 and epoch % s.caption_dropout_every_n_epochs == 0:
        drop = True
    if drop:
        return ""

    if s.enable_wildcard:
        caption = _apply_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if s.shuffle_caption or s.token_warmup_step > 0 or s.caption_tag_dropout_rate > 0:
        sep = s.caption_separator
        fixed: list[str] = []
        fixed_suffix: list[str] = []
        if s.keep_tokens_separator and s.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(s.keep_tokens_separator, 1)
            if s.keep_tokens_separator in flex_part:
                flex_part, suffix_part = flex_part.split(s.keep_tokens_separator, 1)
                fixed_suffix = _split(suffix_part, sep)
            fixed = _split(fixed_part, sep)
            flex = _split(flex_part, sep)
        else:
            tokens = _split(caption, sep)
            keep = max(0, int(s.keep_tokens))
            fixed, flex = tokens[:keep], tokens[keep:]

        warmup = warmup_steps(s.token_warmup_step, max_train_steps)
        if warmup > 0 and step < warmup:
            n = math.floor(step * (len(flex) - s.token_warmup_min) / warmup) + s.token_warmup_min
            flex = flex[: max(0, n)]

        if s.shuffle_caption:
            rng.shuffle(flex)
        if s.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= s.caption_tag_dropout_rate]

        caption = ", ".join(fixed + flex + fixed_suffix)

    if s.secondary_separator:
        caption = caption.replace(s.secondary_separator, s.caption_separator)
    return caption


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The non-empty, stripped tags of a caption."""
    return _split(caption, separator)


def count_tags(captions: Iterable[str], lowercase: bool = True, into: dict[str, int] | None = None) -> dict[str, int]:
    """Tag frequency as kohya counts it for ``ss_tag_frequency``: split on ",", strip, skip empty, lowercase.

    ``lowercase=False`` keeps each tag's original case (for a human-facing tag list).
    """
    counts = {} if into is None else into
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if not tag:
                continue
            if lowercase:
                tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return counts
