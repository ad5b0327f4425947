"""Bulk tag editing (scripts/edit_tags.py): each edit and their order, line endings and encodings,
the diff, dry runs, the backup zip and --restore, bad input, and the popup."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from popups.asker import ScriptedAsker
from sd_scripts.data.tag_editing import TagEdits, edit_caption, edit_tags, plan_edits, restore_backup
from sd_scripts.data.tag_text import parse_replacements, underscores_to_spaces
from tests.helpers import load_tool, run_tool



def run(argv, capsys):
    return run_tool("edit_tags", argv, capsys)


def _dataset(root: Path) -> Path:
    """Two subsets, a nested folder, a caption without an image, a hidden folder."""
    (root / "10_alice").mkdir(parents=True)
    (root / "3_bob" / "extra").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "10_alice/1": b"1girl, Solo, white_background, red_eyes, solo\r\nsecond, line\r\n",
        "10_alice/2": b"solo,  smile ,1girl",  # no final line ending, odd spacing
        "3_bob/1": "\ufeffbob, caf\u00e9, ^_^".encode("utf-8"),
        "3_bob/extra/1": b"simple background, bob\n",
        ".hidden/1": b"solo\n",
    }
    for stem, data in files.items():
        (root / f"{stem}.txt").write_bytes(data)
        (root / f"{stem}.png").write_bytes(b"not decoded")
    (root / "10_alice" / "notes.txt").write_bytes(b"solo, my notes\n")  # no image: left alone
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the edits


def test_each_edit_and_their_order():
    tags = ["Long_Hair", "solo", "white_background", "^_^", "red eyes", "SOLO", "mychar", "o_o"]
    assert edit_tags(tags, TagEdits(lowercase=True)) == ["long_hair", "solo", "white_background", "^_^", "red eyes",
                                                         "solo", "mychar", "o_o"]
    assert edit_tags(tags, TagEdits(remove_underscore=True))[:4] == ["Long Hair", "solo", "white background", "^_^"]
    assert edit_tags(tags, TagEdits(remove_underscore=True))[-1] == "o_o"
    assert edit_tags(tags, TagEdits(remove=("*_background", "solo"))) == ["Long_Hair", "^_^", "red eyes", "mychar",
                                                                         "o_o"]
    # replacement: case-insensitive, a target may hold several tags, an empty one removes
    assert edit_tags(["a", "B", "c"], TagEdits(replace=(("b", "x, y"), ("c", "")))) == ["a", "x", "y"]
    # trigger words go first (moved there when already present), in the order given
    assert edit_tags(["x", "MyChar", "y"], TagEdits(trigger_words=("mychar", "style"))) == ["mychar", "style", "x", "y"]
    assert edit_tags(["b", "a", "B", "c"], TagEdits(dedupe=True)) == ["b", "a", "c"]
    assert edit_tags(["z", "c", "b", "a"], TagEdits(sort=True, keep_tokens=2)) == ["z", "c", "a", "b"]
    # all together: lower-case -> underscores -> replace -> remove -> trigger -> dedupe -> sort
    edits = TagEdits(lowercase=True, remove_underscore=True, replace=(("red eyes", "crimson eyes"),),
                     remove=("solo",), trigger_words=("mychar",), dedupe=True, sort=True, keep_tokens=1)
    assert edit_tags(tags, edits) == ["mychar", "^_^", "crimson eyes", "long hair", "o_o", "white background"]


def test_underscores_and_replacement_syntax():
    assert [underscores_to_spaces(t) for t in ("blue_eyes", "(o)_(o)", "<|>_<|>", "x_x", "a_b_c")] == \
        ["blue eyes", "(o)_(o)", "<|>_<|>", "x_x", "a b c"]
    assert parse_replacements(r"a,b;c\,d,e\;f; ;g,") == [("a", "b"), ("c,d", "e;f"), ("g", "")]


def test_line_endings_bom_and_untouched_lines_are_kept():
    edits = TagEdits(remove=("x",))
    assert edit_caption("a, x\r\nb,  c\r\n", edits) == "a\r\nb,  c\r\n"  # the second line's tags don't change
    assert edit_caption("a,x", edits) == "a"
    assert edit_caption("a\rx, b\r", edits) == "a\rb\r"
    assert edit_caption("\n\na, x\n", edits) == "\n\na\n"


# ---------------------------------------------------------------- the dataset


def test_plan_reads_every_subset_and_only_captions_of_images(tmp_path):
    root = _dataset(tmp_path / "data")
    before = _snapshot(root)
    plan = plan_edits(str(root), TagEdits(trigger_words=("bob",)))
    assert plan.captions == 4 and plan.orphans == 1  # .hidden skipped; notes.txt has no image
    assert sorted(c.relative for c in plan.changes) == ["10_alice/1.txt", "10_alice/2.txt", "3_bob/extra/1.txt"]
    assert _snapshot(root) == before  # planning writes nothing


def test_dry_run_prints_the_diff_and_writes_nothing(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    before = _snapshot(root)
    code, out, err = run([root, "--remove_tags", "*_background, solo", "--dry_run"], capsys)
    assert code == 0 and err == ""
    assert _snapshot(root) == before
    assert "10_alice/1.txt\n  - 1girl, Solo, white_background, red_eyes, solo\n  + 1girl, red_eyes\n" in out
    assert "second, line" not in out  # unchanged lines are not shown
    assert "3 of 4 captions would change (dry run: nothing written); 1 .txt files without an image left alone" in out
    code, out, _ = run([root, "--remove_tags", "solo", "--dry_run", "--summary_only"], capsys)
    assert code == 0 and out.strip() == ("2 of 4 captions would change (dry run: nothing written); "
                                         "1 .txt files without an image left alone")


def test_edit_backs_up_writes_and_restores(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    before = _snapshot(root)
    code, out, _ = run([root, "--trigger_words", "mychar", "--remove_tags", "solo", "--lowercase", "--dedupe"], capsys)
    assert code == 0
    backups = sorted(root.glob("captions_backup_*.zip"))
    assert len(backups) == 1 and f"--restore \"{backups[0]}\"" in out
    assert (root / "10_alice" / "1.txt").read_bytes() == \
        b"mychar, 1girl, white_background, red_eyes\r\nmychar, second, line\r\n"
    assert (root / "10_alice" / "2.txt").read_bytes() == b"mychar, smile, 1girl"
    assert (root / "3_bob" / "1.txt").read_bytes() == "\ufeffmychar, bob, caf\u00e9, ^_^".encode("utf-8")
    assert (root / "10_alice" / "notes.txt").read_bytes() == b"solo, my notes\n"
    assert (root / "10_alice" / "1.png").read_bytes() == b"not decoded"
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    with zipfile.ZipFile(backups[0]) as z:
        names = sorted(n for n in z.namelist() if n.startswith("captions/"))
        assert names == ["captions/10_alice/1.txt", "captions/10_alice/2.txt", "captions/3_bob/1.txt",
                         "captions/3_bob/extra/1.txt"]
        assert z.read("captions/10_alice/1.txt") == before["10_alice/1.txt"]
    edited = _snapshot(root)
    code, out, _ = run(["--restore", backups[0]], capsys)
    assert code == 0 and "restored 4 captions into" in out
    after = _snapshot(root)
    for name, data in before.items():
        assert after[name] == data, name
    # the restore backed up what it replaced, so it can be undone as well
    second = [p for p in root.glob("captions_backup_*.zip") if p != backups[0]]
    assert len(second) == 1
    result = restore_backup(str(second[0]))
    assert len(result.restored) == 4 and (root / "10_alice" / "1.txt").read_bytes() == edited["10_alice/1.txt"]


def test_backup_dir_queue_file_and_several_folders(tmp_path, capsys):
    a = _dataset(tmp_path / "a")
    b = _dataset(tmp_path / "b")
    listing = tmp_path / "folders.txt"
    listing.write_text("# my datasets\nb\n\n", encoding="utf-8")
    code, out, _ = run([a, "--queue", listing, "--sort", "--backup_dir", tmp_path / "backups"], capsys)
    assert code == 0
    assert len(list((tmp_path / "backups").glob("captions_backup_*.zip"))) == 2
    assert not list(a.glob("*.zip")) and not list(b.glob("*.zip"))
    assert (b / "3_bob" / "extra" / "1.txt").read_bytes() == b"bob, simple background\n"
    assert str(a / "10_alice" / "2.txt") in out and "in " + str(b) in out


def test_nothing_changes_nothing_written(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    code, out, _ = run([root, "--remove_tags", "not there"], capsys)
    assert code == 0 and "changed 0 of 4 captions" in out and not list(root.glob("*.zip"))


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args, words", [
    (["{missing}", "--dedupe"], "does not exist"),
    (["{file}", "--dedupe"], "is a file"),
    (["{root}"], "nothing to do"),
    ([], "dataset: missing"),
    (["{root}", "--keep_tokens", "2", "--dedupe"], "--sort"),
    (["{root}", "--sort", "--keep_tokens", "-1"], "keep_tokens"),
    (["{root}", "--replace_tags", "a,b,c"], "replace_tags"),
    (["{root}", "--dedupe", "--caption_extension", "txt"], "caption_extension"),
    (["{root}", "--dedupe", "--backup_dir", "{file}"], "backup_dir"),
    (["{root}", "--dedupe", "--queue", "{missing}"], "queue"),
    (["--restore", "{missing}"], "restore"),
    (["--restore", "{file}"], "not a caption backup"),
    (["{root}", "--bogus"], "unrecognized"),
])
def test_bad_input(tmp_path, capsys, args, words):
    root = _dataset(tmp_path / "data")
    file = tmp_path / "file.zip"
    file.write_bytes(b"just bytes")
    before = _snapshot(tmp_path)
    argv = [a.format(root=root, missing=tmp_path / "missing", file=file) for a in args]
    code, out, err = run(argv, capsys) if "--bogus" not in argv else _argparse_exit(argv, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert _snapshot(tmp_path) == before


def _argparse_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("edit_tags").main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_a_caption_that_is_not_utf8_stops_everything(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    (root / "3_bob" / "1.txt").write_bytes("bob, caf\u00e9".encode("latin-1"))
    before = _snapshot(root)
    code, _, err = run([root, "--dedupe", "--trigger_words", "x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "3_bob" in err and "is not UTF-8 text (byte 0xe9" in err and "save it as UTF-8" in err
    assert _snapshot(root) == before


def test_a_backup_with_paths_outside_the_dataset_is_refused(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("manifest.json", '{"root": "%s", "files": []}' % str(root).replace("\\", "\\\\"))
        z.writestr("captions/../../outside.txt", "x")
    code, _, err = run(["--restore", evil], capsys)
    assert code == 2 and "outside the dataset folder" in err
    assert not (tmp_path / "outside.txt").exists()


# ---------------------------------------------------------------- the popup


def test_popup_dry_run_by_default_then_runs_the_tool(tmp_path, capsys, monkeypatch):
    import popups

    root = _dataset(tmp_path / "data")
    before = _snapshot(root)
    script = {"dataset": str(root), "edits": [["trigger_words", "replace_tags", "sort"]], "trigger_words": "mychar",
              "replace_tags": ["a,b,c", "red_eyes,red eyes"], "keep_tokens": 1}
    asker = ScriptedAsker(script)
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    code, out, _ = run(["--popup"], capsys)
    assert code == 0
    assert "not a 'source,target' pair" in asker.questions("replace_tags")[1].error
    assert _snapshot(root) == before and "(dry run: nothing written)" in out
    assert "  + mychar, 1girl, red eyes, Solo, solo, white_background" in out
    for q in asker.asked:
        assert q.help and q.prompt and q.title, q.key
    argv = popups.edit_tags.flow(ScriptedAsker({**script, "replace_tags": "red_eyes,red eyes", "dry_run": False}))
    assert argv == [str(root), "--trigger_words", "mychar", "--replace_tags", "red_eyes,red eyes", "--sort",
                    "--keep_tokens", "1"]


def test_popup_restore(tmp_path):
    from popups.edit_tags import flow

    backup = tmp_path / "captions_backup_1.zip"
    backup.write_bytes(b"x")
    asker = ScriptedAsker({"task": "restore", "restore": [str(tmp_path / "other.txt"), str(backup)]})
    assert flow(asker) == ["--restore", str(backup)]
    assert "not found" in asker.questions("restore")[1].error
