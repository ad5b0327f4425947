#!/usr/bin/env python
"""Edit the tags of every caption in a dataset at once: trigger words, removals, replacements, order.

    python scripts/edit_tags.py my_dataset --trigger_words "mychar" --remove_tags "solo, *_background" --dry_run
    python scripts/edit_tags.py my_dataset --replace_tags "red eyes,crimson eyes;1girl,woman" --dedupe
    python scripts/edit_tags.py my_dataset --sort --keep_tokens 1
    python scripts/edit_tags.py --restore my_dataset/captions_backup_20260101-120000.zip

Every caption file (--caption_extension, default .txt) that belongs to an image is edited, in the
dataset folder and all its subfolders (each <repeats>_<name> subset). The edits run in this order:
--lowercase, --remove_underscore, --replace_tags, --remove_tags, --trigger_words (put first),
--dedupe, --sort (the first --keep_tokens tags stay where they are). Tags are compared without
regard to case, and with _ and a space alike (red_eyes is red eyes); * in --remove_tags matches
any text.

A diff of every caption that changes is printed (--summary_only: just the counts). Before
anything is written the captions about to change are zipped into captions_backup_<time>.zip in
the dataset folder (or --backup_dir); --restore ZIP puts them back. Captions are read and
written as UTF-8 with their line endings kept; a file that is not UTF-8 stops the run before
anything changes. Several dataset folders may be given, or a --queue txt file (one per line).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tool_cli as cli  # noqa: E402

TOOL = "edit_tags"


def build_parser():
    p = cli.ToolParser(prog="edit_tags.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("dataset", nargs="*", help="dataset folder(s): every caption in them and their subfolders is edited")
    p.add_argument("--queue", default=None, help="txt file listing dataset folders, one per line (# comments)")
    p.add_argument("--trigger_words", "--trigger_word", dest="trigger_words", default=None,
                   help="comma-separated words put first in every caption (moved there if already present)")
    p.add_argument("--remove_tags", default=None, help="comma-separated tags to remove; * matches any text (*_background)")
    p.add_argument("--replace_tags", "--tag_replacement", dest="replace_tags", default=None,
                   help="'old,new;old2,new2' (\\, for a comma inside a tag; an empty new tag removes the old one)")
    p.add_argument("--dedupe", action="store_true", help="keep each tag once (the first time it appears)")
    p.add_argument("--sort", action="store_true", help="sort the tags alphabetically, after the first --keep_tokens")
    p.add_argument("--keep_tokens", type=int, default=0,
                   help="with --sort: the first N tags stay where they are (the keep_tokens you train with)")
    p.add_argument("--lowercase", action="store_true", help="lower-case every tag")
    p.add_argument("--remove_underscore", action="store_true",
                   help="underscores to spaces (long_hair -> long hair), emoticons such as ^_^ excepted")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                   help="extension of the caption files (default .txt)")
    p.add_argument("--dry_run", action="store_true", help="print what would change and write nothing")
    p.add_argument("--summary_only", action="store_true", help="print only the counts, not the diff of each caption")
    p.add_argument("--backup_dir", default=None,
                   help="folder for the backup zip of the changed captions (default: the dataset folder)")
    p.add_argument("--restore", default=None, metavar="ZIP",
                   help="put back the captions of a captions_backup_<time>.zip (into the folder it came from, or the "
                        "dataset folder given)")
    p.add_argument("--popup", action="store_true", help="answer questions in windows instead of using flags")
    return p


def _edits(args):
    from sd_scripts.data.tag_editing import TagEdits
    from sd_scripts.data.tag_text import parse_replacements, parse_tag_list
    from sd_scripts.core.errors import ConfigError

    if args.keep_tokens < 0:
        raise ConfigError(f"keep_tokens: must be 0 or more, got {args.keep_tokens}", setting="keep_tokens")
    edits = TagEdits(
        trigger_words=tuple(parse_tag_list(args.trigger_words)),
        remove=tuple(parse_tag_list(args.remove_tags)),
        replace=tuple(parse_replacements(args.replace_tags, "replace_tags")),
        dedupe=args.dedupe,
        keep_tokens=args.keep_tokens,
        sort=args.sort,
        lowercase=args.lowercase,
        remove_underscore=args.remove_underscore,
    )
    if edits.empty:
        raise ConfigError("edit_tags: nothing to do; add --trigger_words, --remove_tags, --replace_tags, --dedupe, "
                          "--sort, --lowercase or --remove_underscore (or --restore ZIP)", setting="edit_tags")
    if args.keep_tokens and not args.sort:
        raise ConfigError("keep_tokens: only --sort moves tags; add --sort, or leave out --keep_tokens",
                          setting="keep_tokens")
    return edits


def _folders(args) -> list[str]:
    from sd_scripts.core.errors import ConfigError

    folders = list(args.dataset)
    if args.queue:
        folders += cli.read_folder_list(args.queue)
    if not folders:
        raise ConfigError("dataset: missing; give the dataset folder (or --queue FILE with one folder per line)",
                          setting="dataset")
    return folders


def _print_diff(plan, show_root: bool) -> None:
    for change in plan.changes:
        shown = os.path.join(plan.root, change.relative) if show_root else change.relative
        print(shown)
        for old, new in zip(change.old.splitlines(), change.new.splitlines()):
            if old != new:
                print(f"  - {old.lstrip(chr(0xFEFF))}")
                print(f"  + {new.lstrip(chr(0xFEFF))}")


def _restore(args) -> int:
    from sd_scripts.data.tag_editing import restore_backup
    from sd_scripts.core.errors import ConfigError

    if len(args.dataset) > 1 or args.queue:
        raise ConfigError("restore: give one backup zip and at most one dataset folder", setting="restore")
    result = restore_backup(args.restore, args.dataset[0] if args.dataset else None, args.backup_dir)
    for relative in result.restored:
        print(f"restored {relative}")
    same = f"; {result.unchanged} already matched the backup" if result.unchanged else ""
    print(f"restored {len(result.restored)} captions into {result.root}{same}")
    if result.backup_of_current:
        print(f"the captions they replaced are in {result.backup_of_current}")
    return 0


def main(argv=None) -> int:
    args = cli.parse_args(build_parser, TOOL, argv)
    if args is None:
        return 0
    if args.restore:
        return _restore(args)
    from sd_scripts.data.tag_editing import apply_edits, plan_edits

    folders = _folders(args)
    edits = _edits(args)
    plans = [plan_edits(folder, edits, args.caption_extension) for folder in folders]  # all read before any write
    for plan in plans:
        if not args.summary_only:
            _print_diff(plan, len(plans) > 1)
        where = f" in {plan.root}" if len(plans) > 1 else ""
        orphans = f"; {plan.orphans} {args.caption_extension} files without an image left alone" if plan.orphans else ""
        if args.dry_run:
            print(f"{len(plan.changes)} of {plan.captions} captions would change{where} (dry run: nothing written)"
                  f"{orphans}")
            continue
        backup = apply_edits(plan, args.backup_dir)
        print(f"changed {len(plan.changes)} of {plan.captions} captions{where}{orphans}")
        if backup:
            print(f"backup of the old captions: {backup}")
            print(f"undo: python scripts/edit_tags.py --restore \"{backup}\"")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
