"""The README's settings table, generated from ArgStore.

``python -m frontend.settings_table`` rewrites the part of README.md between the markers
``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->``; ``--check`` only reports
whether it is in step (a test runs the same check).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from frontend.fields import SettingInfo, format_value  # noqa: E402

__all__ = ["START", "END", "render_settings_table", "update_readme"]

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
    """Markdown: one table per group, every ArgStore setting with type, default and help."""
    from ArgsList import GROUPS, ArgStore

    infos = ArgStore.settings()
    lines = [
        START,
        "<!-- Generated from ArgsList.py by `python -m frontend.settings_table`; edit ArgsList.py, not this table. -->",
        "",
        f"Every setting ({len(infos)}) can be set in `ArgsList.py`, in a JSON file or as a `--flag` of `main.py`. "
        "Empty default = not set.",
    ]
    for group in GROUPS:
        members = [info for info in infos if info.group == group]
        if not members:
            continue
        lines += ["", f"#### {group}", "", "| Setting | Type | Default | Required | What it does |",
                  "| --- | --- | --- | --- | --- |"]
        for info in members:
            default = "" if info.default is None else f"`{format_value(info.default)}`"
            help_text = info.help + (f" (use {info.deprecated})" if info.deprecated else "")
            flags = f"`{info.name}`" + "".join(f" (`{name}`)" for name in info.cli_names)
            lines.append(f"| {flags} | {_cell(_type_text(info))} | {_cell(default)} | "
                         f"{'yes' if info.required else ''} | {_cell(help_text)} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: str, check_only: bool = False) -> bool:
    """Put the table between the markers (appending a section if they are missing); True if changed."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    table = render_settings_table()
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        new = before + table + after
    else:
        new = text.rstrip("\n") + ("\n\n" if text else "") + "## Settings\n\n" + table + "\n"
    if new == text:
        return False
    if not check_only:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(new)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    readme = os.path.join(ROOT, "README.md")
    changed = update_readme(readme, check_only="--check" in args)
    if "--check" in args:
        print("README settings table is out of step: run python -m frontend.settings_table" if changed
              else "README settings table is in step")
        return 1 if changed else 0
    print("README settings table updated" if changed else "README settings table already in step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
