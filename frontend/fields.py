"""Declaring settings and turning raw values (JSON, command line, kohya_ss strings) into typed ones.

``setting(...)`` is the dataclass field used in ``ArgsList.py``; it stores the help text, group,
choices and path kind in the field's metadata. ``settings_info(ArgStore)`` reads them back as
:class:`SettingInfo` records, the one description that the command line, the JSON checks, the
wizard and the README table are generated from. ``coerce(info, value)`` converts one raw value
and raises :class:`ValueError` with a short reason ("expected an integer, got 'abc'").
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SettingInfo",
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


def setting(
    default: Any,
    help: str,
    *,
    group: str,
    required: bool = False,
    choices: tuple | list | None = None,
    aliases: dict[str, str] | None = None,
    open_choices: bool = False,
    path: str | None = None,
    cli_names: tuple[str, ...] = (),
    deprecated: str | None = None,
    session: bool = False,
) -> Any:
    """A settings field for ``ArgStore``.

    Args:
        default: the value used when neither a JSON file nor the command line sets it.
        help: one line for ``-h``, the wizard and the README.
        group: heading the setting is listed under.
        required: the run cannot start while the value is None.
        choices: allowed values; matched without regard to case and stored in the spelling given here.
        aliases: other spellings accepted for a choice (``{"none": "no"}``).
        open_choices: values outside ``choices`` that look like ``package.module.Class`` are allowed.
        path: ``"file"``, ``"dir"``, ``"file_or_dir"``, ``"model"`` (file, folder or hub id) for paths that
            must exist; ``"out_dir"`` for folders that are created when needed.
        cli_names: extra command-line spellings (the 2023 tool's ``--save_json_path``).
        deprecated: what the setting maps to, for settings kept only so old files load.
        session: describes this invocation (JSON to load, where to save one, queue folder), so a
            loaded JSON file never sets it.
    """
    meta = {
        "help": help,
        "group": group,
        "required": required,
        "choices": tuple(choices) if choices else None,
        "aliases": dict(aliases or {}),
        "open_choices": open_choices,
        "path": path,
        "cli_names": tuple(cli_names),
        "deprecated": deprecated,
        "session": session,
    }
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda value=default: copy.deepcopy(value), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingInfo:
    """Everything known about one setting."""

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

    @property
    def is_path(self) -> bool:
        return self.path is not None


_KINDS = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list"}


def _kind_of(annotation: Any) -> tuple[str, bool]:
    """``int | None`` -> ("int", True); ``dict[str, str] | None`` -> ("dict", True)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"unsupported setting type {annotation!r}")
        kind, _ = _kind_of(args[0])
        return kind, optional
    base = origin or annotation
    if base not in _KINDS:
        raise TypeError(f"unsupported setting type {annotation!r}")
    return _KINDS[base], False


_INFO_CACHE: dict[type, list[SettingInfo]] = {}


def settings_info(cls: type) -> list[SettingInfo]:
    """The settings of a dataclass declared with :func:`setting`, in declaration order."""
    if cls in _INFO_CACHE:
        return _INFO_CACHE[cls]
    hints = typing.get_type_hints(cls)
    infos = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind_of(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = f.metadata
        infos.append(
            SettingInfo(
                name=f.name,
                kind=kind,
                optional=optional,
                default=default,
                help=meta.get("help", ""),
                group=meta.get("group", "Other"),
                required=meta.get("required", False),
                choices=meta.get("choices"),
                aliases=meta.get("aliases", {}),
                open_choices=meta.get("open_choices", False),
                path=meta.get("path"),
                cli_names=meta.get("cli_names", ()),
                deprecated=meta.get("deprecated"),
                session=meta.get("session", False),
            )
        )
    _INFO_CACHE[cls] = infos
    return infos


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
