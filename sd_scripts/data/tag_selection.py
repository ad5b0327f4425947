"""From a WD14 tagger's probabilities to the tags of one caption: thresholds, names and order.

* :class:`TagSettings`: kohya's ``tag_images_by_wd14_tagger.py`` settings (thresholds, rating
  tags, ``character_tags_first``, ``always_first_tags``, ``undesired_tags``, ``tag_replacement``,
  ``remove_underscore``, ``character_tag_expand``) plus the MCut automatic thresholds, trigger
  words and the order of the tags.
* :class:`TagVocabulary`: the CSV's tag names as they will be written (character names expanded,
  underscores to spaces, replacements applied, once for all images) and which are undesired.
* :func:`choose_tags`: the tags of one image, in order: trigger words, ``always_first_tags`` that
  were found (in the order given), the rating (``rating="first"``), character tags
  (``character_first``), the other tags sorted by confidence, alphabetically or in the model's
  order, the rating (``rating="last"``). A tag is kept when its probability is at least the
  threshold (kohya's rule); with MCut the threshold is computed per image (for characters never
  below 0.15, as in the taggers' reference demo). Each tag appears once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import ConfigError
from .tag_text import TagMatcher, split_tags, tag_key, underscores_to_spaces
from .wd14_tagger import CHARACTER, GENERAL, RATING, Label, mcut_threshold

__all__ = ["TagSettings", "TagVocabulary", "choose_tags", "ORDERS", "RATING_PLACES", "CHARACTER_MCUT_FLOOR"]

ORDERS = ("confidence", "alphabetical", "model")
RATING_PLACES = ("none", "first", "last")
CHARACTER_MCUT_FLOOR = 0.15


def _check_threshold(value, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"{setting}: must be a probability from 0 to 1 (e.g. 0.35), got {value!r}", setting=setting)


@dataclass(frozen=True)
class TagSettings:
    """How tags are chosen, named and ordered (see the module docstring)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    general_mcut: bool = False
    character_mcut: bool = False
    rating: str = "none"
    character_first: bool = False
    order: str = "confidence"
    undesired: tuple[str, ...] = ()
    replacements: tuple[tuple[str, str], ...] = ()
    remove_underscore: bool = False
    character_tag_expand: bool = False
    always_first: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()

    def __post_init__(self):
        _check_threshold(self.general_threshold, "general_threshold")
        _check_threshold(self.character_threshold, "character_threshold")
        if self.order not in ORDERS:
            raise ConfigError(f"tag_order: {self.order!r} is not one of {', '.join(ORDERS)}", setting="tag_order")
        if self.rating not in RATING_PLACES:
            raise ValueError(f"rating must be one of {RATING_PLACES}, not {self.rating!r}")


def _expand_character(name: str) -> list[str]:
    """kohya's ``character_tag_expand``: ``name_(series)`` -> ``name``, ``series``."""
    if not name.endswith(")") or "(" not in name:
        return [name]
    head, _, tail = name.rpartition("(")
    head = head.rstrip("_ ")
    return [head, tail[:-1]] if head and tail[:-1] else [name]


class TagVocabulary:
    """The tagger's labels as they will be written, computed once."""

    def __init__(self, labels: list[Label], settings: TagSettings):
        replacements = {tag_key(source): split_tags(target) for source, target in settings.replacements}
        undesired = TagMatcher(settings.undesired)
        self.names: list[tuple[str, ...]] = []
        self.unwanted = np.zeros(len(labels), dtype=bool)
        for i, label in enumerate(labels):
            names = [label.name]
            if settings.character_tag_expand and label.category == CHARACTER:
                names = _expand_character(label.name)
            if settings.remove_underscore:
                names = [underscores_to_spaces(n) for n in names]
            names = [out for n in names for out in replacements.get(tag_key(n), [n])]
            self.names.append(tuple(names))
            self.unwanted[i] = bool(undesired) and (undesired(label.name) or any(undesired(n) for n in names))
        categories = np.array([label.category for label in labels])
        self.rating = np.flatnonzero(categories == RATING)
        self.general = np.flatnonzero(categories == GENERAL)
        self.character = np.flatnonzero(categories == CHARACTER)


def _above(probs: np.ndarray, indexes: np.ndarray, threshold: float, mcut: bool, floor: float = 0.0) -> np.ndarray:
    if not indexes.size:
        return indexes
    if mcut:
        threshold = max(floor, mcut_threshold(probs[indexes]))
    return indexes[probs[indexes] >= threshold]


def _ordered(indexes: np.ndarray, probs: np.ndarray, vocab: TagVocabulary, order: str) -> list[int]:
    if order == "confidence":
        return sorted(indexes.tolist(), key=lambda i: (-float(probs[i]), i))
    if order == "alphabetical":
        return sorted(indexes.tolist(), key=lambda i: (tag_key(vocab.names[i][0]) if vocab.names[i] else "", i))
    return sorted(indexes.tolist())


def choose_tags(probs: np.ndarray, vocab: TagVocabulary, settings: TagSettings) -> list[tuple[str, float | None]]:
    """``[(tag, probability)]`` of one image in caption order; trigger words have no probability."""
    s = settings
    keep = ~vocab.unwanted
    general = _above(probs, vocab.general[keep[vocab.general]], s.general_threshold, s.general_mcut)
    character = _above(probs, vocab.character[keep[vocab.character]], s.character_threshold, s.character_mcut,
                       CHARACTER_MCUT_FLOOR if s.character_mcut else 0.0)
    if s.character_first:
        body = _ordered(character, probs, vocab, s.order) + _ordered(general, probs, vocab, s.order)
    else:
        body = _ordered(np.concatenate([general, character]), probs, vocab, s.order)
    rating: list[int] = []
    if s.rating != "none" and vocab.rating.size:
        best = int(vocab.rating[int(np.argmax(probs[vocab.rating]))])
        rating = [] if vocab.unwanted[best] else [best]
    indexes = (rating if s.rating == "first" else []) + body + (rating if s.rating == "last" else [])
    found = [(name, float(probs[i])) for i in indexes for name in vocab.names[i]]
    if s.always_first:
        wanted = [tag_key(t) for t in s.always_first]
        first = sorted((pair for pair in found if tag_key(pair[0]) in wanted), key=lambda p: wanted.index(tag_key(p[0])))
        found = first + [pair for pair in found if tag_key(pair[0]) not in wanted]
    out, seen = [], set()
    for tag, prob in [(t, None) for t in s.trigger_words] + found:
        if tag and tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            out.append((tag, prob))
    return out
