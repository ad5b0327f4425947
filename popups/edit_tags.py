"""Popup for ``scripts/edit_tags.py``: edit the tags of every caption in a dataset, or undo an edit.

The dataset folder, which edits (ticks), the words for each, and whether to only show the diff
(a dry run, the default here: run it again without the dry run once the diff looks right).
"""

from __future__ import annotations

from ._tool_flow import ToolFlow, run_tool_flow

__all__ = ["TOOL", "flow", "ask_arguments", "EDITS"]

TOOL = "edit_tags"
EDITS = ("trigger_words", "remove_tags", "replace_tags", "dedupe", "sort", "lowercase", "remove_underscore")
_LABELS = {
    "trigger_words": "put trigger words first",
    "remove_tags": "remove tags",
    "replace_tags": "replace tags",
    "dedupe": "remove duplicate tags",
    "sort": "sort tags alphabetically",
    "lowercase": "lower-case every tag",
    "remove_underscore": "underscores to spaces",
}
_TEXT_PROMPTS = {
    "trigger_words": ("Trigger word(s) to put first, comma-separated", None),
    "remove_tags": ("Tags to remove, comma-separated (* matches any text)", None),
    "replace_tags": ("Replacements: old,new;old2,new2", None),
}


def _check_replacements(text: str) -> str | None:
    from sd_scripts.data.tag_text import parse_replacements
    from sd_scripts.core.errors import ConfigError

    try:
        parse_replacements(text, "replace_tags")
    except ConfigError as err:
        return str(err).split(": ", 1)[-1]
    return None


def _restore_flow(f: ToolFlow) -> list[str]:
    backup = f.ask("restore", "path", "Choose the caption backup to put back (captions_backup_<time>.zip)",
                   path_kind="file", filetypes=(".zip",))
    return ["--restore", backup]


def flow(asker) -> list[str]:
    f = ToolFlow(asker, TOOL)
    task = f.ask("task", "choice", "What do you want to do?", "edit", options=("edit", "restore"),
                 labels={"edit": "edit the tags of a dataset's captions", "restore": "undo an edit (restore a backup)"},
                 help="every edit first zips the captions it changes; restoring puts them back")
    if task == "restore":
        return _restore_flow(f)
    dataset = f.ask("dataset", "path", "Choose the dataset folder (its subfolders are included)", path_kind="dir")
    argv = [dataset]
    chosen = f.ask("edits", "checks", "Which edits?", ["trigger_words"], options=EDITS, labels=_LABELS, low=1,
                   help="they run in the order listed")
    for key in chosen:
        if key in _TEXT_PROMPTS:
            check = _check_replacements if key == "replace_tags" else None
            text = f.ask(key, "text", _TEXT_PROMPTS[key][0], _TEXT_PROMPTS[key][1], check=check)
            argv += [f"--{key}", text]
        else:
            argv.append(f"--{key}")
    if "sort" in chosen:
        keep = f.ask("keep_tokens", "number", "How many tags at the front stay where they are?", 1, integer=True, low=0)
        if keep:
            argv += ["--keep_tokens", str(keep)]
    if f.ask("dry_run", "yes_no", "Only show what would change (a dry run, nothing written)?", True):
        argv.append("--dry_run")
    return argv


def ask_arguments(asker=None) -> list[str] | None:
    """The arguments for ``scripts/edit_tags.py`` (None when cancelled)."""
    return run_tool_flow(TOOL, flow, asker)
