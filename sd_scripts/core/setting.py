"""How one setting is declared: :class:`Setting`, its value :class:`Range` and the check of a value against both.

A ``Setting`` holds everything the program derives from a setting: its name in ``ArgsList.py``, JSON files and
``main.py`` flags, its name in the engine (``TrainConfig``, kohya's command line), type, defaults, help line,
heading, range or choices, unit, the other spellings it is read under (the 2023 tool's, the kohya_ss GUI's), its
``ss_*`` metadata key, the training wizard's step that asks it and which layers use it. The table of every
setting is :mod:`sd_scripts.core.settings`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["Setting", "Range", "SAME", "section", "at_least", "above", "between", "is_number", "shown"]


class _Same:
    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()  # "the engine uses the front end's value here"

_LAYERS = ("both", "front", "engine", "none")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: Any) -> str:
    """A value as range messages write it: numbers as ``{:g}`` (1e-05, 0.5, 3), anything else as repr."""
    return f"{value:g}" if is_number(value) else repr(value)


@dataclass(frozen=True)
class Range:
    """Allowed numbers: ``low``/``high`` (``None``: no bound), open ends, whole numbers only.

    The message reads ``must be <words>, got <value>``; ``words`` replaces the generated wording
    ("1 or more", "above 0", "between 0 and 1", "a whole number from 0 to 1000"), ``note`` is added in
    brackets ("(leave it unset to turn it off)"). The rest keeps each message as it has always read: ``shows`` is how
    the value is written ("g": numbers as ``{:g}``, 1 and -1; "str": as Python prints it, -1.0 and abc; "repr":
    -1.0 and 'abc'), ``nan_words`` what a value that is not a finite number must be ("a number"; None: the range's
    own wording), ``got`` what comes between the wording and the value. ``checked=False`` makes it the wizard's bound
    only: its question refuses other numbers, the command line, JSON files and the engine take any (as they always
    have).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    note: str = ""
    words: str = ""
    shows: str = "g"
    nan_words: str | None = "a number"
    got: str = ", got"
    checked: bool = True

    def wording(self) -> str:
        if self.words:
            return self.words
        low, high = (None if b is None else f"{b:g}" for b in (self.low, self.high))
        if high is None:
            text = f"above {low}" if self.low_open else f"{low} or more"
            if self.whole:
                text = "a whole number " + ("above " + low if self.low_open else f"of {text}")
        elif self.low_open:
            text = f"above {low} and " + (f"below {high}" if self.high_open else f"at most {high}")
        elif self.high_open:
            text = f"from {low} to below {high}"
        elif self.whole:
            text = f"a whole number from {low} to {high}"
        else:
            text = f"between {low} and {high}"
        return f"{text} ({self.note})" if self.note else text

    def contains(self, value: Any) -> bool:
        if not is_number(value) or (self.whole and (isinstance(value, float) and not value.is_integer())):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else ``must be ..., got ...``."""
        if not self.checked or self.contains(value):
            return None
        if not is_number(value) and self.nan_words and not self.whole:
            return f"must be {self.nan_words}, got {value!r}"
        written = {"g": shown, "str": str, "repr": repr}[self.shows](value)
        return f"must be {self.wording()}{self.got} {written}"


def at_least(low: float, **extra: Any) -> Range:
    return Range(low, **extra)


def above(low: float, **extra: Any) -> Range:
    return Range(low, low_open=True, **extra)


def between(low: float, high: float, **extra: Any) -> Range:
    return Range(low, high, **extra)


_IDENTIFIER = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")


@dataclass(frozen=True)
class Setting:
    """One setting, declared once.

    ``name`` is the name users write (``ArgsList.py``, JSON files, ``main.py --name``); ``kohya`` the engine's name
    (``TrainConfig`` field, ``train_network.py --kohya``) where it differs. ``layer`` says who reads it: ``both``,
    ``front`` (the front end acts on it; ``feeds`` names the engine setting it is turned into, if any), ``engine``
    (kohya's command line only) or ``none`` (kept so files load; refused when set). ``default`` is the front end's
    (the 2023 tool's); ``kohya_default``, ``kohya_type``, ``kohya_help``, ``kohya_range`` and ``kohya_choices`` only
    where the engine's differ. ``kohya_cli_default`` is kohya's own argparse default where it differs from the
    engine's (``TrainConfig``'s, which library callers get): the kohya command line (``train_network.py``) uses it, so
    a kohya command line runs as it does in kohya. ``range`` is checked where the front end takes a value (command line, JSON files,
    wizard) and, unless ``kohya_range`` says otherwise (``None``: not there), by the engine's preflight too.
    """

    name: str
    type: Any
    default: Any
    help: str
    group: str | None = None  # heading in -h and the README
    layer: str = "both"
    kohya: str | None = None
    kohya_type: Any = SAME
    kohya_default: Any = SAME
    kohya_cli_default: Any = SAME
    kohya_help: str | None = None
    kohya_range: Range | None = SAME  # None: the engine does not check the range
    kohya_choices: tuple | None = SAME
    kohya_choices_text: str | None = None  # the engine's message for a value outside its choices ({value})
    feeds: str | None = None
    range: Range | None = None
    choices: tuple | None = None
    aliases: dict | None = None
    open_choices: bool = False
    unit: str | None = None
    path: str | None = None  # "file", "dir", "file_or_dir", "model" (must exist) or "out_dir"
    required: bool = False
    session: bool = False  # describes this invocation: a loaded JSON file never sets it
    deprecated: str | None = None  # what replaces it
    cli_names: tuple[str, ...] = ()  # more main.py flags (the 2023 tool's --save_json_path)
    old_names: tuple[str, ...] = ()  # keys of the 2023 tool's JSON files read as this setting
    kohya_ss: tuple[str, ...] | None = None  # kohya_ss GUI keys read as this (default: the engine name)
    gui_zero_unset: bool = False  # the kohya_ss GUI writes 0 for "not set"
    changes_captions: bool = False  # captions differ from step to step while it is on
    metadata: str | None = None  # the ss_* key the LoRA's metadata stores it under
    section: str = ""  # the comment heading it stands under in ArgsList.py (set by :func:`section`)
    wizard: str | None = None  # the training wizard's step that asks it (settings.WIZARD_STEPS); None: not asked

    def __post_init__(self) -> None:
        if self.layer not in _LAYERS:
            raise ValueError(f"{self.name}: layer must be one of {_LAYERS}, got {self.layer!r}")

    # ------------------------------------------------------------------ who reads it
    @property
    def in_front_end(self) -> bool:
        return self.layer != "engine"

    @property
    def in_engine(self) -> bool:
        return self.layer in ("both", "engine")

    @property
    def kohya_name(self) -> str | None:
        """The engine's name; None when the engine does not read it."""
        return (self.kohya or self.name) if self.in_engine else None

    # ------------------------------------------------------------------ the engine's view
    @property
    def engine_default(self) -> Any:
        return self.default if self.kohya_default is SAME else self.kohya_default

    @property
    def cli_default(self) -> Any:
        """The default of ``train_network.py --<kohya name>``: kohya's."""
        return self.engine_default if self.kohya_cli_default is SAME else self.kohya_cli_default

    @property
    def engine_type(self) -> Any:
        """``TrainConfig``'s type: the front end's, optional exactly when the engine's default is None."""
        if self.kohya_type is not SAME:
            return self.kohya_type
        base = _without_none(self.type)
        return base | None if self.engine_default is None else base

    @property
    def engine_range(self) -> Range | None:
        return self.range if self.kohya_range is SAME else self.kohya_range

    @property
    def engine_choices(self) -> tuple | None:
        return self.choices if self.kohya_choices is SAME else self.kohya_choices

    def engine_problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` as the engine's value of this setting (range and choices), or None.
        None values are the engine's "not set" where its type allows them."""
        if value is None:
            if _without_none(self.engine_type) != self.engine_type:
                return None
            checked = self.engine_range is not None and self.engine_range.checked
            return f"must be {self.engine_range.wording()}, got nothing" if checked else None
        if self.engine_range is not None:
            problem = self.engine_range.problem(value)
            if problem:
                return problem
        choices = self.engine_choices
        if choices and value not in choices:
            if self.kohya_choices_text:
                return self.kohya_choices_text.format(value=value)
            return f"{value!r} is not one of {', '.join(str(c) for c in choices)}"
        return None

    def front_problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` as the front end's (already typed) value, or None."""
        if value is None or self.range is None:
            return None
        return self.range.problem(value)

    def engine_help(self, renames: dict[str, str]) -> str:
        """The help line with the front end's setting names replaced by the engine's (``renames``)."""
        if self.kohya_help:
            return self.kohya_help
        return _IDENTIFIER.sub(lambda m: renames.get(m.group(0), m.group(0)), self.help)

    # ------------------------------------------------------------------ the front end's view
    @property
    def optional(self) -> bool:
        return _without_none(self.type) != self.type

    @property
    def kind(self) -> str:
        """"bool", "int", "float", "str", "dict" or "list"."""
        base = _without_none(self.type)
        origin = typing.get_origin(base) or base
        return {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list"}[origin]

    @property
    def gui_names(self) -> tuple[str, ...]:
        """The kohya_ss GUI keys read as this setting (its engine name, when that is a plain rename)."""
        if self.kohya_ss is not None:
            return self.kohya_ss
        name = self.kohya_name
        return (name,) if name and name != self.name and not self.feeds else ()

    def fresh_default(self) -> Any:
        return _copy(self.default)

    def fresh_engine_default(self) -> Any:
        return _copy(self.engine_default)


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (list, dict)) else value


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return tp


def section(title: str, *settings: Setting) -> tuple[Setting, ...]:
    """Settings that stand together under ``# ---- title`` in ``ArgsList.py``."""
    return tuple(dataclasses.replace(s, section=title) for s in settings)
