"""The command line of ``main.py``, generated from ArgStore.

Every ArgStore setting is a flag of the same name (plus the 2023 spellings ``--save_json_path`` and
``--multi_run_path``). Only flags actually given end up in the parsed values, so a flag always wins
over a JSON file and over ``ArgsList.py`` while everything not given is left to them. Booleans take
an optional value (``--xformers``, ``--xformers false``); settings that may be unset take ``none``;
key/value settings take ``key=value`` pairs or one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .fields import SettingInfo, coerce, format_value

__all__ = ["build_parser", "parse_command_line", "META_FLAGS"]

META_FLAGS = ("popup",)
_NONE_WORDS = {"none", "null"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of a screen of usage."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        self.exit(2, f"error: {message} (python main.py -h lists every setting)\n")


def _accepts_none_word(info: SettingInfo) -> bool:
    return info.optional and not (info.kind == "str" and not info.choices and not info.is_path)


def _converter(info: SettingInfo):
    def convert(text: str) -> Any:
        if info.optional and (text == "" or (_accepts_none_word(info) and text.strip().lower() in _NONE_WORDS)):
            return None
        try:
            return coerce(info, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = info.kind
    return convert


def _metavar(info: SettingInfo) -> str:
    if info.choices and len(info.choices) <= 4:
        return "{" + ",".join(str(c) for c in info.choices) + "}"
    if info.is_path:
        return "PATH"
    return {"int": "N", "float": "X", "str": "TEXT", "bool": "BOOL"}.get(info.kind, "NAME")


def _help(info: SettingInfo) -> str:
    parts = [info.help.replace("%", "%%")]
    if info.choices and len(info.choices) > 4:
        parts.append("choices: " + ", ".join(str(c) for c in info.choices))
    if info.deprecated:
        parts.append(f"use {info.deprecated}")
    if info.default is not None:
        parts.append(f"default: {format_value(info.default)}".replace("%", "%%"))
    elif info.required:
        parts.append("required")
    return "; ".join(parts)


def _list_converter(info: SettingInfo):
    def convert(values: list[str]) -> Any:
        if len(values) == 1 and info.optional and values[0].strip().lower() in _NONE_WORDS | {""}:
            return None
        if info.kind == "dict" and len(values) == 1 and values[0].lstrip().startswith("{"):
            return coerce(info, values[0])
        return coerce(info, list(values))

    return convert


class _StoreMany(argparse.Action):
    """nargs='*' for key=value and name lists, converted as a whole."""

    def __init__(self, *args, info: SettingInfo, **kwargs):
        self._info = info
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, _list_converter(self._info)(values or []))
        except ValueError as err:
            parser.error(f"argument {option_string}: {err}")


def build_parser(store_cls: type | None = None) -> argparse.ArgumentParser:
    """The parser for every ArgStore setting, grouped as in ``ArgsList.py``."""
    if store_cls is None:
        from ArgsList import ArgStore as store_cls  # noqa: N813
    from ArgsList import GROUPS

    parser = _Parser(
        prog="main.py",
        usage="python main.py [--setting VALUE ...]   (or accelerate launch main.py ...)",
        description="Train a LoRA or LyCORIS network for Stable Diffusion. Settings come from ArgsList.py, "
        "then a JSON file (--load_json_path), then these flags; each flag overrides the others for its setting.",
        allow_abbrev=False,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=38, width=110),
    )
    modes = parser.add_argument_group("Run modes")
    modes.add_argument("--popup", action="store_true", default=argparse.SUPPRESS,
                       help="answer questions in windows instead of editing settings")
    groups: dict[str, Any] = {}
    infos = store_cls.settings()
    order = GROUPS + sorted({i.group for i in infos} - set(GROUPS))
    for name in order:
        groups[name] = parser.add_argument_group(name)
    for info in infos:
        flags = [f"--{info.name}", *info.cli_names]
        group = groups[info.group]
        common = dict(dest=info.name, default=argparse.SUPPRESS, help=_help(info))
        if info.kind == "bool":
            group.add_argument(*flags, nargs="?", const=True, type=_converter(info), metavar="BOOL", **common)
        elif info.kind in ("dict", "list"):
            metavar = "KEY=VALUE" if info.kind == "dict" else "NAME"
            group.add_argument(*flags, nargs="*", action=_StoreMany, info=info, metavar=metavar, **common)
        else:
            group.add_argument(*flags, type=_converter(info), metavar=_metavar(info), **common)
    return parser


def parse_command_line(argv: list[str] | None = None, store_cls: type | None = None) -> tuple[dict, dict]:
    """Parse ``argv``; return (settings given on the command line, run-mode flags given)."""
    parser = build_parser(store_cls)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else argv)
    given = vars(namespace)
    modes = {name: given.pop(name) for name in META_FLAGS if name in given}
    return given, modes
