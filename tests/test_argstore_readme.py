"""The README's settings table is generated from ArgStore and kept in step with it."""

from __future__ import annotations

import os

from ArgsList import ArgStore
from frontend.settings_table import END, START, render_settings_table, update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_settings_table_is_in_step_with_argstore():
    readme = os.path.join(ROOT, "README.md")
    assert not update_readme(readme, check_only=True), (
        "README.md's settings table differs from ArgsList.py: run python -m frontend.settings_table")


def test_table_lists_every_setting_once():
    table = render_settings_table()
    assert table.startswith(START) and table.endswith(END)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(ArgStore.settings())
    names = [row.split("`")[1] for row in rows]
    assert sorted(names) == sorted(ArgStore.setting_names())
    for row in rows:
        assert row.replace("\\|", "").count(" | ") == 5, row  # a | inside a cell is escaped
    wizard = {row.split("`")[1]: row.replace("\\|", "").split(" | ")[4].strip() for row in rows}
    assert wizard["net_dim"] == "Network" and wizard["noise_offset"] == ""  # the step that asks it, if any


def test_update_only_touches_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold table\n{END}\n\n## After\ntext\n", encoding="utf-8")
    assert update_readme(str(readme)) is True
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nintro\n\n" + START) and text.endswith(END + "\n\n## After\ntext\n")
    assert update_readme(str(readme)) is False


def test_argslist_is_in_step_with_the_declarations():
    from frontend.settings_table import update_argslist

    assert not update_argslist(os.path.join(ROOT, "ArgsList.py"), check_only=True), (
        "ArgsList.py differs from sd_scripts/core/settings.py: run python -m frontend.settings_table")
