"""``ArgsList.py``, written from the setting declarations (:mod:`sd_scripts.core.settings`).

``ArgsList.py`` is the file users edit to change their defaults, so it lists every setting of the front end
with its type, default and help line, in the declared order under the declared section comments.
``python -m frontend.settings_table`` rewrites it (and the README's table) after a declaration changed;
``render_argslist()`` is what it writes, and a test keeps the file in step.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from sd_scripts.core.setting import Setting
from sd_scripts.core.settings import front_settings

__all__ = ["render_argslist"]

_WIDTH = 118

HEADER = '''"""ArgStore: every training setting of LoRA Easy Training Scripts, with its default.

Editing this file is a supported way to configure a run, as in the 2023 tool: change a default below
(``net_dim: int = setting(32, ...)`` -> ``setting(64, ...)``) and run ``python main.py``. A JSON file
loaded with ``--load_json_path`` overrides these defaults key by key, and command-line flags override
both. Paths may be written as plain strings; on Windows use raw strings (``r"C:\\\\models\\\\sd15.safetensors"``).

``None`` means "not set": the engine then uses its own behaviour for that setting.

Each setting is declared (type, help, range, choices, kohya name, ...) in ``sd_scripts/core/settings.py``; this
file is written from there by ``python -m frontend.settings_table``, which puts the declared defaults back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from frontend.fields import SettingsStore, setting
from sd_scripts.core.settings import GROUPS, OPTIMIZERS, SAMPLERS, SCHEDULERS

__all__ = ["ArgStore", "GROUPS", "OPTIMIZERS", "SCHEDULERS", "SAMPLERS"]


@dataclass
class ArgStore(SettingsStore):'''


def _type_text(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        args = ", ".join(_type_text(arg) for arg in typing.get_args(tp))
        return f"{typing.get_origin(tp).__name__}[{args}]"
    if tp is Any:
        return "Any"
    return tp.__name__


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_value_text(k)}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return repr(value)


def _string_lines(text: str, first_room: int, room: int) -> list[str]:
    """``text`` as adjacent string literals: the first fits ``first_room`` characters, the others ``room``."""
    parts, current, limit = [], "", first_room
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(_value_text(candidate)) + 1 > limit:
            parts.append(current + " ")
            current, limit = word, room
        else:
            current = candidate
    parts.append(current)
    return [_value_text(part) for part in parts]


def _entry(decl: Setting) -> list[str]:
    head = f"    {decl.name}: {_type_text(decl.type)} = setting("
    default = f"        {_value_text(decl.default)}, "
    strings = _string_lines(decl.help, _WIDTH - len(default) - 1, _WIDTH - 9)
    lines = [head, default + strings[0]]
    lines += [f"        {part}" for part in strings[1:]]
    lines[-1] += ")"
    return lines


def render_argslist() -> str:
    """The text of ``ArgsList.py``."""
    lines = [HEADER]
    section = None
    for decl in front_settings():
        if decl.section != section:
            section = decl.section
            if len(lines) > 1:
                lines.append("")
            lines.append(f"    # {'-' * 66} {section}")
        lines += _entry(decl)
    return "\n".join(lines) + "\n"
