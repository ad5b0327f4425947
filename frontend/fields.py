"""The front end's view of the settings, and turning raw values (JSON, command line, kohya_ss strings) into typed ones.

Every setting is declared once in :mod:`sd_scripts.core.settings`. ``ArgsList.py`` (generated from that table,
edited by users) gives each one its default with ``setting(default, help)``; ``settings_info(ArgStore)`` joins
the two into :class:`SettingInfo` records, the description that the command line, the JSON checks, the wizard
and the README table are generated from. ``coerce(info, value)`` converts one raw value and raises
:class:`ValueError` with a short reason ("expected an integer, got 'abc'").
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.setting import Range, Setting
from sd_scripts.core.settings import declared

__all__ = [
    "SettingInfo",
    "SettingsStore",
    "setting",
    "settings_info",
    "coerce",
    "parse_bool",
    "parse_key_values",
    "format_value",
    "type_label",
]

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


def setting(default: Any, help: str = "") -> Any:
    """A field of ``ArgStore`` with the user's default; everything else about the setting is declared in
    :mod:`sd_scripts.core.settings` (``help`` is repeated in ``ArgsList.py`` for its readers)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda value=default: copy.deepcopy(value))
    return field(default=default)


@dataclass(frozen=True)
class SettingInfo:
    """Everything known about one setting: its declaration, with the default ``ArgsList.py`` gives it."""

    name: str
    kind: str  # "bool", "int", "float", "str", "dict" or "list"
    optional: bool
    default: Any
    help: str
    group: str
    required: bool = False
    choices: tuple | None = None
    aliases: dict = field(default_factory=dict)
    open_choices: bool = False
    path: str | None = None
    cli_names: tuple[str, ...] = ()
    deprecated: str | None = None
    session: bool = False
    range: Range | None = None
    declaration: Setting | None = None

    @property
    def is_path(self) -> bool:
        return self.path is not None


def info_of(decl: Setting, default: Any) -> SettingInfo:
    return SettingInfo(name=decl.name, kind=decl.kind, optional=decl.optional, default=default, help=decl.help,
                       group=decl.group or "Other", required=decl.required, choices=decl.choices,
                       aliases=dict(decl.aliases or {}), open_choices=decl.open_choices, path=decl.path,
                       cli_names=decl.cli_names, deprecated=decl.deprecated, session=decl.session,
                       range=decl.range, declaration=decl)


_INFO_CACHE: dict[type, list[SettingInfo]] = {}


def settings_info(cls: type) -> list[SettingInfo]:
    """The settings of ``ArgStore`` (a dataclass of :func:`setting` fields), in file order."""
    if cls in _INFO_CACHE:
        return _INFO_CACHE[cls]
    infos = []
    for f in dataclasses.fields(cls):
        try:
            decl = declared(f.name)
        except KeyError:
            raise TypeError(f"{cls.__name__}.{f.name} is not a declared setting (sd_scripts/core/settings.py)") from None
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        infos.append(info_of(decl, default))
    _INFO_CACHE[cls] = infos
    return infos


class SettingsStore:
    """What ``ArgStore`` can do besides holding the settings."""

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        """Every setting with its type, default, help, group and choices, in file order."""
        return settings_info(cls)

    @classmethod
    def setting_names(cls) -> list[str]:
        return [info.name for info in settings_info(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The flat dict saved in JSON files (ArgStore names, file order)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def convert_args_to_dict(self) -> dict[str, Any]:
        """The 2023 tool's name for :meth:`to_dict`, kept for old scripts."""
        return self.to_dict()

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


def type_label(info: SettingInfo) -> str:
    """How the expected type is named in messages and in the README."""
    return {
        "bool": "true/false",
        "int": "an integer",
        "float": "a number",
        "str": "a path" if info.is_path else "text",
        "dict": "an object of key/value pairs",
        "list": "a list of names",
    }[info.kind]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected true/false, got {value!r}")


def parse_key_values(text: str) -> dict[str, str]:
    """``"weight_decay=0.1 betas=0.9,0.99"`` -> ``{"weight_decay": "0.1", "betas": "0.9,0.99"}``."""
    out: dict[str, str] = {}
    try:
        items = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"cannot split {text!r} into key=value pairs ({err})") from None
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs, got {item!r}")
        out[key.strip()] = val.strip()
    return out


_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        number = float(value)
        if number.is_integer():
            return int(number)
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def _to_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import json

            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"not a valid JSON object ({err.msg})") from None
            if isinstance(parsed, dict):
                return parsed
            raise ValueError(f"expected an object of key/value pairs, got {value!r}")
        return parse_key_values(text)
    if isinstance(value, (list, tuple)):
        # one key=value per item (the command line already split them), so values may hold spaces
        out = {}
        for item in value:
            key, sep, val = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value pairs, got {item!r}")
            out[key.strip()] = val.strip()
        return out
    raise ValueError(f"expected an object of key/value pairs, got {value!r}")


def _to_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    raise ValueError(f"expected a list of names, got {value!r}")


def _match_choice(info: SettingInfo, value: Any) -> Any:
    if not info.choices:
        return value
    lowered = str(value).strip().lower()
    for alias, target in info.aliases.items():
        if lowered == alias.lower():
            return target
    for choice in info.choices:
        if str(choice).lower() == lowered:
            return choice
    if info.open_choices and isinstance(value, str) and re.match(r"^[\w.]+\.\w+$", value.strip()):
        return value.strip()
    listed = ", ".join(str(c) for c in info.choices)
    extra = " or a package.module.Class name" if info.open_choices else ""
    raise ValueError(f"{value!r} is not one of {listed}{extra}")


def coerce(info: SettingInfo, value: Any) -> Any:
    """Convert a raw value to the setting's type; raise ValueError saying what was expected."""
    if value is None:
        if info.optional:
            return None
        raise ValueError(f"expected {type_label(info)}, got null")
    if info.kind == "bool":
        result = parse_bool(value)
    elif info.kind == "int":
        result = _to_int(value)
    elif info.kind == "float":
        result = _to_float(value)
    elif info.kind == "dict":
        result = _to_dict(value)
    elif info.kind == "list":
        result = _to_list(value)
    else:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"expected {type_label(info)}, got {value!r}")
        result = str(value)
    return _match_choice(info, result)


def format_value(value: Any) -> str:
    """A value as it reads in ``-h`` and in the README (``None`` shown as ``None``)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "[]"
    if isinstance(value, str) and value == "":
        return '""'
    return str(value)
