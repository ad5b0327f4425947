"""The README's settings table and ``ArgsList.py``, generated from the setting declarations.

``python -m frontend.settings_table`` rewrites ``ArgsList.py`` (:mod:`frontend.argslist_file`) and the part of
README.md between the markers ``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->``; ``--check``
only reports whether they are in step (tests run the same checks). Run it after changing
``sd_scripts/core/settings.py``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from frontend.fields import SettingInfo, format_value  # noqa: E402

__all__ = ["START", "END", "render_settings_table", "update_readme", "update_argslist"]

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


def _type_text(info: SettingInfo) -> str:
    if info.choices:
        return " / ".join(str(c) for c in info.choices)
    if info.is_path:
        return "path"
    return {"bool": "true/false", "int": "integer", "float": "number", "str": "text",
            "dict": "key=value pairs", "list": "list of names"}[info.kind]


def _cell(text: str) -> str:
    return (text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
            .replace("\n", " "))


def render_settings_table() -> str:
    """Markdown: one table per group, every ArgStore setting with type, default, the wizard step that asks it and
    help."""
    from ArgsList import GROUPS, ArgStore

    infos = ArgStore.settings()
    lines = [
        START,
        "<!-- Generated from sd_scripts/core/settings.py by `python -m frontend.settings_table`; edit the declarations, "
        "not this table. -->",
        "",
        f"Every setting ({len(infos)}) can be set in `ArgsList.py`, in a JSON file or as a `--flag` of `main.py`. "
        "Empty default = not set. Wizard: the step of `main.py --popup` that asks it (empty: the wizard leaves it "
        "as the file or flags have it).",
    ]
    for group in GROUPS:
        members = [info for info in infos if info.group == group]
        if not members:
            continue
        lines += ["", f"#### {group}", "", "| Setting | Type | Default | Required | Wizard | What it does |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for info in members:
            default = "" if info.default is None else f"`{format_value(info.default)}`"
            help_text = info.help + (f" (use {info.deprecated})" if info.deprecated else "")
            flags = f"`{info.name}`" + "".join(f" (`{name}`)" for name in info.cli_names)
            wizard = info.declaration.wizard if info.declaration else None
            lines.append(f"| {flags} | {_cell(_type_text(info))} | {_cell(default)} | "
                         f"{'yes' if info.required else ''} | {wizard or ''} | {_cell(help_text)} |")
    lines.append(END)
    return "\n".join(lines)


def _read(path: str) -> str:
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def _rewrite(path: str, text: str, new: str, check_only: bool) -> bool:
    """Write ``new`` unless it is ``text`` already (or only checking); True if it differs."""
    if new == text:
        return False
    if not check_only:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(new)
    return True


def update_readme(path: str, check_only: bool = False) -> bool:
    """Put the table between the markers (appending a section if they are missing); True if changed."""
    text = _read(path)
    table = render_settings_table()
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        new = before + table + after
    else:
        new = text.rstrip("\n") + ("\n\n" if text else "") + "## Settings\n\n" + table + "\n"
    return _rewrite(path, text, new, check_only)


def update_argslist(path: str, check_only: bool = False) -> bool:
    """Write ``ArgsList.py`` from the declarations (the declared defaults); True if it changed."""
    from frontend.argslist_file import render_argslist

    return _rewrite(path, _read(path), render_argslist(), check_only)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    changed = False
    for name, label, update in (("ArgsList.py", "ArgsList.py", update_argslist),
                                ("README.md", "README settings table", update_readme)):
        differs = update(os.path.join(ROOT, name), check_only=check)
        changed |= differs
        if check:
            print(f"{label} is out of step: run python -m frontend.settings_table" if differs
                  else f"{label} is in step")
        else:
            print(f"{label} updated" if differs else f"{label} already in step")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
