"""Tags as text: splitting and joining captions, underscores, replacement pairs, and tag lists.

Pure functions shared by the tagger (``scripts/tag_images.py``) and the bulk tag editor
(``scripts/edit_tags.py``); nothing here reads or writes files.

* :func:`split_tags` / :func:`join_tags`: a caption line is tags separated by commas; spaces
  around each tag are not part of it, empty tags are dropped.
* :func:`underscores_to_spaces`: ``long_hair`` -> ``long hair``, but emoticons (``^_^``,
  ``(o)_(o)``, every tag of three characters or fewer, as kohya's ``--remove_underscore``) keep
  their underscores.
* :func:`parse_tag_list` and :func:`parse_replacements` read the user's settings
  (``"a, b"``; kohya's ``"source,target;source2,target2"`` with ``\\,`` and ``\\;`` escapes).
* :func:`tag_key` / :class:`TagMatcher`: tags are compared without regard to case (CLIP's
  tokenizer lower-cases captions) and with ``_`` and a space alike (``red_eyes`` is ``red eyes``);
  ``*`` is a wildcard (``*_background``).
"""

from __future__ import annotations

import re
from typing import Iterable

from ..core.errors import ConfigError

__all__ = [
    "KAOMOJIS",
    "split_tags",
    "join_tags",
    "underscores_to_spaces",
    "parse_tag_list",
    "parse_replacements",
    "dedupe_tags",
    "tag_key",
    "TagMatcher",
]

# The emoticon tags of the Danbooru tag set whose underscores are part of the face (the list the
# WD14 tagger demos use).
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


def split_tags(line: str, separator: str = ",") -> list[str]:
    """The non-empty tags of one caption line, stripped."""
    sep = separator.strip() or separator
    return [t.strip() for t in line.split(sep) if t.strip()]


def join_tags(tags: Iterable[str], separator: str = ", ") -> str:
    return separator.join(tags)


def underscores_to_spaces(tag: str) -> str:
    """``long_hair`` -> ``long hair``; emoticons keep their underscores."""
    if tag in KAOMOJIS or len(tag) <= 3:
        return tag
    return tag.replace("_", " ")


def tag_key(tag: str) -> str:
    """How tags are compared: without regard to case, surrounding spaces, or ``_`` against a space."""
    return tag.strip().casefold().replace("_", " ")


def dedupe_tags(tags: Iterable[str]) -> list[str]:
    """Each tag once (the first time it appears), compared by :func:`tag_key`."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def parse_tag_list(text: str | Iterable[str] | None, separator: str = ",") -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; a list (several flag values) is split item by item."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        out.extend(split_tags(str(item), separator))
    return out


_ESCAPED_COMMA, _ESCAPED_SEMICOLON = "\x00c", "\x00s"


def parse_replacements(text: str | Iterable[str] | None, setting: str = "tag_replacement") -> list[tuple[str, str]]:
    """kohya's ``source,target;source2,target2`` (``\\,`` and ``\\;`` for a literal comma or
    semicolon) as ``[(source, target)]``. An empty target removes the tag. ConfigError naming
    ``setting`` for a pair that is not ``source,target``."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    pairs = []
    for item in items:
        escaped = str(item).replace("\\,", _ESCAPED_COMMA).replace("\\;", _ESCAPED_SEMICOLON)
        for part in escaped.split(";"):
            if not part.strip():
                continue
            fields = part.split(",")
            shown = part.replace(_ESCAPED_COMMA, "\\,").replace(_ESCAPED_SEMICOLON, "\\;").strip()
            if len(fields) != 2 or not fields[0].strip():
                raise ConfigError(f"{setting}: {shown!r} is not a 'source,target' pair; write pairs like "
                                  f"'old tag,new tag;other,another' (\\, for a comma inside a tag)", setting=setting)
            source, target = (f.replace(_ESCAPED_COMMA, ",").replace(_ESCAPED_SEMICOLON, ";").strip() for f in fields)
            pairs.append((source, target))
    return pairs


class TagMatcher:
    """Does a tag match one of the given names? Case-insensitive; ``*`` matches any text."""

    def __init__(self, names: Iterable[str]):
        self.exact: set[str] = set()
        patterns = []
        for name in names:
            key = tag_key(name)
            if "*" in key:
                patterns.append(".*".join(re.escape(p) for p in key.split("*")))
            elif key:
                self.exact.add(key)
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def __bool__(self) -> bool:
        return bool(self.exact) or self.pattern is not None

    def __call__(self, tag: str) -> bool:
        key = tag_key(tag)
        return key in self.exact or (self.pattern is not None and self.pattern.fullmatch(key) is not None)
