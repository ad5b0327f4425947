"""``key=value`` settings (``optimizer_args``, ``lr_scheduler_args``) parsed into keyword arguments, and the small
helpers the optimizer and scheduler builders share.
"""

from __future__ import annotations

import ast
import logging
import re
from typing import Any, Iterable

from sd_scripts.core.errors import ConfigError

__all__ = ["STRING_KEYS", "parse_kv_args", "emit_warnings", "is_schedule_free"]

logger = logging.getLogger("sd_scripts.training.optimizers")

# keys whose value may be free text (kept as the raw string when it is not a Python literal)
STRING_KEYS = frozenset({"step_rules"})


# --------------------------------------------------------------------------------------------
# key=value parsing
# --------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_NEXT_PAIR_RE = re.compile(r"\s+[A-Za-z_][A-Za-z0-9_.]*=")


def _split_pairs(text: str) -> list[str]:
    """Split ``"a=1 b=(1, 2) c='x y'"`` into pairs: at whitespace outside quotes/brackets followed by ``key=``."""
    pairs, start, depth, quote, i = [], 0, 0, None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch.isspace() and depth == 0 and _NEXT_PAIR_RE.match(text, i):
            pairs.append(text[start:i])
            start = i
        i += 1
    pairs.append(text[start:])
    return [p.strip() for p in pairs if p.strip()]


def _parse_value(raw: str, key: str, setting_name: str, string_keys: Iterable[str]) -> Any:
    text = raw.strip()
    if text == "":
        raise ConfigError(f'{setting_name}: "{key}=" has no value; write e.g. {key}=0.01', setting_name)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if text.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[text.lower()]
    if key in string_keys:
        return text
    raise ConfigError(
        f'{setting_name}: value of {key} ({text}) is not a Python literal; write a number, True/False, '
        f'a tuple like 0.9,0.99, or quote text: {key}="{text}"',
        setting_name,
    )


def _from_json_value(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    return value


def parse_kv_args(items: Any, setting_name: str, string_keys: Iterable[str] = STRING_KEYS) -> dict[str, Any]:
    """Parse ``key=value`` settings into a kwargs dict.

    ``items`` may be ``None``, a list of ``"key=value"`` strings (a list item may hold several pairs
    separated by spaces), one string ``"a=1 b=0.9,0.99"``, or a dict (string values are parsed like
    ``key=value`` text, lists become tuples, other values are kept). Values are parsed with
    ``ast.literal_eval``; ``true``/``false``/``none`` in any case are accepted too. A value that is not a
    literal raises ``ConfigError`` naming ``setting_name`` and the key, unless the key is in ``string_keys``.
    A key given twice is an error.
    """
    string_keys = frozenset(string_keys)
    if items is None:
        return {}
    result: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if not _KEY_RE.match(key):
            raise ConfigError(f'{setting_name}: "{key}" is not a valid argument name; write key=value, e.g. weight_decay=0.01', setting_name)
        if key in result:
            raise ConfigError(f"{setting_name}: {key} is given twice; keep one {key}=...", setting_name)
        result[key] = value

    if isinstance(items, dict):
        for key, value in items.items():
            key = str(key).strip()
            if isinstance(value, str):
                put(key, _parse_value(value, key, setting_name, string_keys))
            else:
                put(key, _from_json_value(value))
        return result
    if isinstance(items, str):
        items = [items]
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(f"{setting_name}: expected key=value strings, got {type(items).__name__}; write e.g. weight_decay=0.01", setting_name) from None
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{setting_name}: {item!r} is not a key=value string; write e.g. weight_decay=0.01", setting_name)
        for pair in _split_pairs(item):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ConfigError(f'{setting_name}: "{pair}" is not key=value; write e.g. weight_decay=0.01', setting_name)
            put(key, _parse_value(value, key, setting_name, string_keys))
    return result


def emit_warnings(found: list[str], warnings: list[str] | None) -> None:
    """Add ``found`` to the caller's ``warnings`` list, or log them when it passes none."""
    if warnings is not None:
        warnings.extend(found)
    else:
        for w in found:
            logger.warning(w)


def is_schedule_free(optimizer) -> bool:
    """True for schedule-free optimizers (they need ``optimizer.train()`` / ``optimizer.eval()`` around sampling/saving)."""
    name = type(optimizer).__name__.lower()
    return name.endswith("schedulefree") and hasattr(optimizer, "train") and hasattr(optimizer, "eval")
