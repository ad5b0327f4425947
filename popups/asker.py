"""Questions, the asker interface, and a scripted asker for tests.

A flow (``training_flow``, one module per side tool) never touches a widget: it builds a
:class:`Question` and hands it to :func:`ask`, which asks an :class:`Asker` until the answer passes
the question's own checks. The tkinter asker (``tk_asker``) shows real windows; the
:class:`ScriptedAsker` answers from a dict, so every branch of a flow runs in tests without a screen.

Rules shared by every asker:

* closing a question's window means "use the default" (the asker returns ``question.default``);
* the Cancel button ends the whole wizard (the asker raises :class:`Cancelled`);
* an answer that fails the checks is asked again with the reason in ``question.error``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

__all__ = [
    "Asker",
    "CANCEL",
    "CLOSE",
    "Cancelled",
    "KINDS",
    "Question",
    "ScriptedAsker",
    "Working",
    "ask",
    "describe",
]

KINDS = ("yes_no", "choice", "number", "text", "path", "sliders", "checks", "summary")
# path kinds: existing "file" / "dir", "file_or_dir", "model" (file, diffusers folder or hub id),
# "out_dir" (a folder created when needed), "save_file" (a file to write).
PATH_KINDS = ("file", "dir", "file_or_dir", "model", "out_dir", "save_file")


class Cancelled(Exception):
    """The user pressed Cancel: the wizard ends and nothing runs."""


@dataclass(frozen=True)
class Question:
    """One question, with everything an asker needs to show it and a flow needs to check it.

    ``default`` is what closing the window gives. ``optional`` lets an empty answer mean None
    (shown as ``none_label``). Numbers are checked against ``low``/``high`` (``low_open``: the
    answer must be above ``low``); ``check`` adds a rule of the flow's own (returns a reason or
    None). ``error`` holds the reason the previous answer was refused. ``settings`` names the
    settings the answer decides.
    """

    key: str
    kind: str
    prompt: str
    title: str = ""
    help: str = ""
    default: Any = None
    options: tuple = ()
    labels: dict = field(default_factory=dict)
    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    step: float | None = None
    optional: bool = False
    none_label: str = "not set"
    path_kind: str | None = None
    filetypes: tuple = ()
    details: tuple = ()
    check: Callable[[Any], str | None] | None = None
    error: str | None = None
    settings: tuple = ()  # the settings the answer decides (the training wizard's questions)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown question kind {self.kind!r}")
        if self.kind == "path" and self.path_kind not in PATH_KINDS:
            raise ValueError(f"unknown path kind {self.path_kind!r}")

    def label(self, option: Any) -> str:
        return str(self.labels.get(option, option))

    def default_text(self) -> str:
        """How the default reads in the window ("Default: ...")."""
        return describe(self, self.default)

    def check_answer(self, raw: Any) -> tuple[Any, str | None]:
        """``(value, None)`` for a good answer, ``(None, reason)`` otherwise."""
        try:
            value = _CONVERT[self.kind](self, raw)
        except ValueError as err:
            return None, str(err)
        if self.check is not None and value is not None:
            reason = self.check(value)
            if reason:
                return None, reason
        return value, None


def describe(question: Question, value: Any) -> str:
    """A value as the user reads it (an option's label, "yes", "off" for an unset number...)."""
    if value is None or value == "":
        return question.none_label
    if question.kind == "yes_no":
        return "yes" if value else "no"
    if question.kind in ("choice", "summary"):
        return question.label(value)
    if question.kind == "sliders":
        return ", ".join(f"{question.label(o)}: {v:g}" for o, v in zip(question.options, value))
    if question.kind == "checks":
        return ", ".join(question.label(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ------------------------------------------------------------------------------------- conversion
def _number_text(value: float) -> str:
    return f"{value:g}"


def _to_number(q: Question, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if q.optional:
            return None
        raise ValueError("enter a number" + (" (this one has no default)" if q.default is None else ""))
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        what = "a whole number" if q.integer else "a number"
        raise ValueError(f"expected {what}, got {text!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {text!r}")
    if q.integer:
        if not number.is_integer():
            raise ValueError(f"expected a whole number, got {text!r}")
        number = int(number)
    _check_range(q, number)
    return number


def _check_range(q: Question, number: float) -> None:
    low, high = q.low, q.high
    if low is not None and high is not None:
        if number < low or number > high or (q.low_open and number == low):
            opening = "above" if q.low_open else "from"
            raise ValueError(f"must be {opening} {_number_text(low)} to {_number_text(high)}, got {_number_text(number)}")
    elif low is not None:
        if q.low_open and number <= low:
            raise ValueError(f"must be above {_number_text(low)}, got {_number_text(number)}")
        if number < low:
            raise ValueError(f"must be {_number_text(low)} or more, got {_number_text(number)}")
    elif high is not None and number > high:
        raise ValueError(f"must be {_number_text(high)} or less, got {_number_text(number)}")


def _to_bool(q: Question, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("yes", "y", "true", "1"):
        return True
    if text in ("no", "n", "false", "0"):
        return False
    raise ValueError(f"answer yes or no, got {raw!r}")


def _to_choice(q: Question, raw: Any) -> Any:
    for option in q.options:
        if raw == option or str(raw).strip().lower() in (str(option).lower(), q.label(option).lower()):
            return option
    shown = ", ".join(q.label(o) for o in q.options)
    raise ValueError(f"choose one of: {shown}")


def _to_text(q: Question, raw: Any) -> str | None:
    text = "" if raw is None else str(raw).strip()
    if not text:
        if q.optional:
            return None
        raise ValueError("enter some text")
    return text


def _to_path(q: Question, raw: Any) -> str | None:
    text = "" if raw is None else str(raw).strip().strip('"')
    if not text:
        if q.optional:
            return None
        raise ValueError("choose a " + ("folder" if q.path_kind in ("dir", "out_dir") else "file")
                         + (" (this one has no default)" if q.default is None else ""))
    from frontend.resolve import looks_like_hub_id

    expanded = os.path.expanduser(text)
    if q.path_kind == "model" and not os.path.exists(expanded) and looks_like_hub_id(text):
        return text
    path = os.path.normpath(os.path.abspath(expanded))
    kind = q.path_kind
    if kind == "file" and not os.path.isfile(path):
        raise ValueError(f"not found: {path}" if not os.path.exists(path) else f"{path} is a folder; choose a file")
    if kind == "dir" and not os.path.isdir(path):
        raise ValueError(f"folder not found: {path}" if not os.path.exists(path) else f"{path} is a file; choose a folder")
    if kind == "file_or_dir" and not os.path.exists(path):
        raise ValueError(f"not found: {path}")
    if kind == "model" and not os.path.exists(path):
        raise ValueError(f"not found: {path} (give a .safetensors/.ckpt file, a diffusers folder or a Hugging Face id)")
    if kind == "out_dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; choose a folder")
    if kind == "save_file":
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder; give a file name")
        parent = os.path.dirname(path)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ValueError(f"{parent} is a file, not a folder")
    if q.filetypes and kind in ("file", "save_file"):
        exts = tuple(ext.lower() for ext in q.filetypes)
        if not path.lower().endswith(exts):
            if kind == "save_file" and not os.path.splitext(path)[1]:
                return path + q.filetypes[0]
            raise ValueError(f"{os.path.basename(path)} is not a {' / '.join(q.filetypes)} file")
    return path


def _to_sliders(q: Question, raw: Any) -> list[float]:
    values = list(raw)
    if len(values) != len(q.options):
        raise ValueError(f"expected {len(q.options)} values, got {len(values)}")
    out = []
    for value in values:
        number = float(value)
        _check_range(q, number)
        out.append(number)
    return out


def _to_checks(q: Question, raw: Any) -> list:
    chosen = [option for option in q.options if option in list(raw)]
    unknown = [v for v in raw if v not in q.options]
    if unknown:
        raise ValueError(f"not an option: {', '.join(map(str, unknown))}")
    if len(chosen) < int(q.low or 0):
        raise ValueError(f"tick at least {int(q.low)}")
    return chosen


_CONVERT: dict[str, Callable[[Question, Any], Any]] = {
    "yes_no": _to_bool,
    "choice": _to_choice,
    "summary": _to_choice,
    "number": _to_number,
    "text": _to_text,
    "path": _to_path,
    "sliders": _to_sliders,
    "checks": _to_checks,
}


# ------------------------------------------------------------------------------------- askers
class Asker(Protocol):
    """What a flow needs from a user interface."""

    def ask(self, question: Question) -> Any:
        """The raw answer (``question.default`` when the window was closed); raise Cancelled on Cancel."""

    def tell(self, title: str, text: str, level: str = "info") -> None:
        """Show a message ("info", "warning" or "error") and wait until it is read."""

    def working(self, title: str, text: str) -> "Working":
        """A context shown while something slow runs; ``.update(done, total)`` reports progress."""


class Working:
    """What :meth:`Asker.working` returns; this one shows nothing (scripted runs)."""

    def __init__(self):
        self.updates: list[tuple[int, int]] = []

    def __enter__(self) -> "Working":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, done: int, total: int) -> None:
        self.updates.append((done, total))


def ask(asker: Asker, question: Question) -> Any:
    """Ask until the answer passes the question's checks; return the checked value."""
    while True:
        value, reason = question.check_answer(asker.ask(question))
        if reason is None:
            return value
        question = dataclasses.replace(question, error=reason)


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLOSE = _Sentinel("CLOSE")  # the user closed the window: the default
CANCEL = _Sentinel("CANCEL")  # the user pressed Cancel


class ScriptedAsker:
    """Answers questions from ``answers`` (question key -> answer, or a list of answers used in turn).

    A key that is not listed, or whose list is used up, gets :data:`CLOSE` (the default), as when
    the user closes the window; but a question asked again after a refused answer, with nothing
    left to answer it, cancels (as a user who gives up would). :data:`CANCEL` raises
    :class:`Cancelled`. Every question asked and every message told is recorded.
    """

    def __init__(self, answers: dict[str, Any] | None = None, max_repeats: int = 25):
        self.answers = {k: list(v) if isinstance(v, list) else [v] for k, v in (answers or {}).items()}
        self.asked: list[Question] = []
        self.told: list[tuple[str, str, str]] = []
        self.worked: list[tuple[str, str, Working]] = []
        self.max_repeats = max_repeats

    @property
    def keys(self) -> list[str]:
        return [q.key for q in self.asked]

    def questions(self, key: str) -> list[Question]:
        return [q for q in self.asked if q.key == key]

    def ask(self, question: Question) -> Any:
        self.asked.append(question)
        if len(self.questions(question.key)) > self.max_repeats:
            raise AssertionError(f"question {question.key!r} asked {self.max_repeats} times; last error: {question.error}")
        queue = self.answers.get(question.key)
        if not queue and question.error is not None:
            raise Cancelled(question.key)  # asked again, and the script has no better answer: the user gives up
        answer = queue.pop(0) if queue else CLOSE
        if answer is CANCEL:
            raise Cancelled(question.key)
        if answer is CLOSE:
            return question.default
        return answer

    def tell(self, title: str, text: str, level: str = "info") -> None:
        self.told.append((title, text, level))

    def working(self, title: str, text: str) -> Working:
        self.worked.append((title, text, Working()))
        return self.worked[-1][2]

    def close(self) -> None:
        pass
