"""The dataset report (sd_scripts/data/dataset_report.py, report_picture.py, scripts/dataset_report.py): counts,
problems, the training's own buckets, token counts, the picture, and every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sd_scripts.data.caption_tokens import TokenCounter, estimate_tokens
from sd_scripts.data.dataset_report import build_report
from sd_scripts.data.near_duplicates import near_duplicate_pairs, perceptual_hashes
from sd_scripts.data import report_picture
from sd_scripts.data.report_picture import save_report_picture
from sd_scripts.core.config import TrainConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_layout import scan_dataset
from tests.helpers import load_tool, tree_digest

ROOT = Path(__file__).resolve().parents[1]


TOOL = load_tool("dataset_report")


def _picture(path: Path, size, seed: int) -> None:
    """A picture that hashes unlike the others of another seed: bands at a seed-given angle and spacing."""
    img = Image.new("RGB", size, (seed * 37 % 255, 90, 160))
    d = ImageDraw.Draw(img)
    step = 6 + seed * 5
    for k in range(-size[1], size[0] + size[1], step):
        if seed % 2:
            d.line([k, 0, k + size[1] // (1 + seed % 3), size[1]], fill=(250, 250, 240), width=step // 2)
        else:
            d.line([0, k, size[0], k - size[0] // (1 + seed % 4)], fill=(10, 10, 20), width=step // 2)
    d.ellipse([size[0] * seed % 7 * 5, 4, size[0] // 2 + seed * 3, size[1] // 2], fill=(seed * 60 % 255, 200, 30))
    img.save(path)


@pytest.fixture()
def dataset(tmp_path):
    """``data/4_thing``: a wide, a tall and a square picture (captioned), a resized copy of the square one, one
    without a caption, a broken file, a caption without an image and a very long caption; ``data/1_other``: one."""
    root = tmp_path / "data"
    main = root / "4_thing"
    main.mkdir(parents=True)
    _picture(main / "wide.png", (192, 96), 1)
    _picture(main / "tall.png", (96, 192), 2)
    _picture(main / "square.png", (128, 128), 3)
    Image.open(main / "square.png").resize((112, 112), Image.Resampling.LANCZOS).save(main / "square_copy.jpg", quality=92)
    _picture(main / "plain.png", (64, 48), 4)
    (main / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (main / "orphan.txt").write_text("thing, lost", encoding="utf-8")
    for name in ("wide", "tall", "square_copy"):
        (main / f"{name}.txt").write_text("thing, blue sky, grass", encoding="utf-8")
    (main / "square.txt").write_text("thing, " + ", ".join(f"word{i} extra" for i in range(60)), encoding="utf-8")
    other = root / "1_other"
    other.mkdir()
    _picture(other / "one.png", (128, 128), 5)
    (other / "one.txt").write_text("thing, grass", encoding="utf-8")
    return root


def _config(data: Path, **overrides) -> TrainConfig:
    values = dict(train_data_dir=str(data), resolution="96", enable_bucket=True, min_bucket_reso=64,
                  max_bucket_reso=192, bucket_reso_steps=32, train_batch_size=2, max_token_length=None)
    values.update(overrides)
    return TrainConfig(**values)


def _by_name(report):
    return {os.path.basename(e.path): e for e in report.images}


# ------------------------------------------------------------------------------------------- the report
def test_report_counts_subsets_problems_tags_and_steps(dataset):
    before = tree_digest(dataset)
    report = build_report(_config(dataset))
    assert tree_digest(dataset) == before  # nothing in the dataset changed

    subsets = {s.name: s for s in report.subsets}
    assert (subsets["4_thing"].images, subsets["4_thing"].repeats, subsets["4_thing"].captioned) == (5, 4, 4)
    assert (subsets["1_other"].images, subsets["1_other"].captioned) == (1, 1)
    images = _by_name(report)
    assert set(images) == {"wide.png", "tall.png", "square.png", "square_copy.jpg", "plain.png", "one.png"}
    assert [os.path.basename(p) for p, _ in report.unreadable] == ["broken.png"]
    assert [os.path.basename(p) for p in report.captions_without_images] == ["orphan.txt"]

    assert images["plain.png"].problems == ["no_caption", "small"]  # 64x48 < 96x96
    assert images["wide.png"].problems == []  # 192x96 has more pixels than 96x96
    assert "long_caption" in images["square.png"].problems  # 60 x "wordN extra" > 75 tokens
    assert images["square.png"].tokens > 75 and report.token_limit == 75 and not report.tokens_exact
    assert [(os.path.basename(a), os.path.basename(b)) for a, b, _ in report.duplicates] == [("square.png",
                                                                                              "square_copy.jpg")]
    assert "duplicate" in images["square_copy.jpg"].problems
    assert report.tag_counts["thing"] == 5 and report.tag_counts["grass"] == 4  # plain.png has no caption

    # steps: per bucket, images x repeats split into batches of 2
    per_bucket = {}
    for e in report.images:
        per_bucket[e.bucket] = per_bucket.get(e.bucket, 0) + e.repeats
    assert report.batches_per_epoch == sum((n + 1) // 2 for n in per_bucket.values())
    text = "\n".join(report.lines())
    for expected in ("subset 4_thing: 5 images x 4 repeats, 4 captioned", "no caption", "4_thing/plain.png",
                     "4_thing/square.png ~ 4_thing/square_copy.jpg", "orphan.txt", "broken.png", "thing (5)",
                     f"{report.steps_per_epoch} steps per epoch", "over 225"):
        assert expected in text, expected


@pytest.mark.parametrize("settings", [
    dict(),
    dict(bucket_no_upscale=True),
    dict(enable_bucket=False),
    dict(resolution="128,96", train_batch_size=3),
])
def test_the_reports_buckets_are_the_training_datasets(dataset, settings):
    config = _config(dataset, **settings)
    report = build_report(config)
    training = TrainDataset(scan_dataset(config), config, seed=1)
    assert {os.path.basename(e.path): e.bucket for e in report.images} == {
        os.path.basename(item.record.path): tuple(item.bucket) for item in training._items}
    counts = {tuple(b["resolution"]): b["count"] for b in training.bucket_info["buckets"].values()}
    assert {bucket: sum(e.repeats for e in entries) for bucket, entries in report.buckets[0].items()} == counts
    assert report.batches_per_epoch == len(training)


def test_held_out_validation_images_are_counted_and_not_placed(dataset):
    config = _config(dataset, validation_split=0.4)
    report = build_report(config)
    plan = scan_dataset(config)
    assert report.held_out == len(plan.validation_images) > 0
    assert {e.path for e in report.images} == {r.path for r in plan.images}
    assert f"{report.held_out} images held out for the validation loss" in "\n".join(report.lines())


def test_exact_token_counts_with_a_clip_tokenizer(dataset, tmp_path):
    from sd_scripts.data.caption_tokens import find_clip_tokenizer
    from sd_scripts.models.text_encoding import count_prompt_tokens
    from sd_scripts.testing.tiny_models import write_tiny_tokenizer

    cache = tmp_path / "tokenizer_cache"
    write_tiny_tokenizer(cache / "openai_clip-vit-large-patch14")
    config = _config(dataset, tokenizer_cache_dir=str(cache), max_token_length=150)
    tokenizer = find_clip_tokenizer(config)
    assert tokenizer is not None
    report = build_report(config, tokenizer=tokenizer)
    assert report.tokens_exact and report.token_limit == 150
    for entry in report.images:
        assert entry.tokens == count_prompt_tokens(tokenizer, entry.caption, weighted=False)
    assert find_clip_tokenizer(_config(dataset, tokenizer_cache_dir=str(tmp_path / "none"))) is None


def test_token_estimate_follows_clips_pieces():
    assert estimate_tokens("1girl, long_hair") == 6  # 1 / girl / , / long / _ / hair
    assert estimate_tokens("a photo of a cat") == 5
    assert estimate_tokens("") == 0 and TokenCounter().count("") == 0
    assert estimate_tokens("supercalifragilistic") == 2  # a long rare word: one token per 12 letters started


def test_caption_prefix_and_suffix_count_as_trained(dataset):
    plain = _by_name(build_report(_config(dataset)))["wide.png"]
    framed = _by_name(build_report(_config(dataset, caption_prefix="masterpiece", caption_suffix="best quality")))
    assert framed["wide.png"].caption == "masterpiece thing, blue sky, grass best quality"
    assert framed["wide.png"].tokens == plain.tokens + 3


def test_near_duplicate_pairs_by_hash_distance():
    hashes = [0b1011, 0b1010, None, 0b0100, 0b1011]
    assert near_duplicate_pairs(hashes, 0) == [(0, 4, 0)]
    assert near_duplicate_pairs(hashes, 1) == [(0, 4, 0), (0, 1, 1), (1, 4, 1)]
    assert near_duplicate_pairs([None, 5], 64) == []


def test_unreadable_images_have_no_hash(tmp_path):
    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    _picture(good, (64, 64), 1)
    bad.write_bytes(b"nope")
    seen = []
    hashes = perceptual_hashes([str(good), str(bad)], lambda done, total: seen.append((done, total)))
    assert isinstance(hashes[0], int) and hashes[1] is None and seen[-1] == (2, 2)


def test_picture_has_chart_and_thumbnails_and_caps_them(dataset, tmp_path):
    report = build_report(_config(dataset))
    full = Path(save_report_picture(report, tmp_path / "full.png"))
    with Image.open(full) as a:
        assert a.format == "PNG" and a.width == 1000
        # a problem frame's colour (NO CAPTION red) is drawn somewhere
        assert (205, 40, 40) in {c for _, c in a.convert("RGB").getcolors(1 << 20)}
    assert not list(tmp_path.glob("*.tmp"))
    # with a cap, problems are drawn first and the rest counted per bucket
    shown = report_picture._shown(report, 2)
    assert sum(len(entries) for _, _, entries, _ in shown) < len(report.images)
    assert sum(len(entries) + left for _, _, entries, left in shown) == len(report.images)
    for _, _, entries, _ in shown:
        flags = [bool(e.problems) for e in entries]
        assert flags == sorted(flags, reverse=True)
    capped = Path(save_report_picture(report, tmp_path / "capped.png", max_thumbnails=2))
    with Image.open(capped) as b:
        assert b.width == 1000


# ------------------------------------------------------------------------------------------- the tool
def _run(argv):
    return TOOL.cli.run(TOOL.main, [str(a) for a in argv])


def test_tool_writes_text_and_picture_beside_the_dataset(dataset, capsys):
    before = tree_digest(dataset)
    assert _run([dataset, "--resolution", "96", "--min_bucket_reso", "64", "--bucket_reso_steps", "32"]) == 0
    png, txt = dataset.parent / "data_report.png", dataset.parent / "data_report.txt"
    assert png.is_file() and txt.is_file()
    out = capsys.readouterr().out
    assert "subset 4_thing: 5 images x 4 repeats" in out and f"wrote {png}" in out
    assert "resolution 96, buckets 64-" in txt.read_text(encoding="utf-8")
    assert tree_digest(dataset) == before
    # again: the files exist, so one line and exit 2, nothing rewritten
    stamp = png.stat().st_mtime_ns
    assert _run([dataset]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: save_to:") and "--overwrite" in err and "\n" not in err
    assert png.stat().st_mtime_ns == stamp
    assert _run([dataset, "--overwrite", "--no_bucket"]) == 0
    assert "no buckets" in txt.read_text(encoding="utf-8")


def test_tool_takes_a_training_json(dataset, tmp_path, capsys):
    settings = tmp_path / "train.json"
    settings.write_text(json.dumps({"img_folder": str(dataset), "train_resolution": 128, "batch_size": 4,
                                    "min_bucket_resolution": 64, "max_bucket_resolution": 256,
                                    "bucket_reso_steps": 32, "max_clip_token_length": 225}), encoding="utf-8")
    assert _run(["--json", settings, "--save_to", tmp_path / "out" / "r.png"]) == 0
    text = (tmp_path / "out" / "r.txt").read_text(encoding="utf-8")
    assert "resolution 128, buckets 64-256 in steps of 32, batch size 4" in text and "max_token_length 225" in text
    # a flag beats the JSON
    assert _run(["--json", settings, "--batch_size", "1", "--save_to", tmp_path / "out" / "r.png", "--overwrite"]) == 0
    assert "batch size 1" in (tmp_path / "out" / "r.txt").read_text(encoding="utf-8")
    capsys.readouterr()


def test_tool_reports_a_folder_of_loose_images_with_repeats(dataset, tmp_path, capsys):
    folder = dataset / "4_thing"
    assert _run([folder, "--repeats", "3", "--save_to", tmp_path / "r.png"]) == 0
    out = capsys.readouterr().out
    assert "subset 4_thing: 5 images x 3 repeats, 4 captioned" in out


@pytest.mark.parametrize("make, argv, setting", [
    (lambda t: None, ["{t}/missing"], "train_data_dir"),
    (lambda t: (t / "empty").mkdir(), ["{t}/empty"], "train_data_dir"),
    (lambda t: (t / "no_images" / "3_x").mkdir(parents=True), ["{t}/no_images"], "train_data_dir"),
    (lambda t: None, [], "train_data_dir"),
    (lambda t: None, ["{t}", "--resolution", "huge"], "resolution"),
    (lambda t: None, ["{t}", "--repeats", "0"], "repeats"),
    (lambda t: None, ["{t}", "--duplicate_distance", "65"], "duplicate_distance"),
    (lambda t: None, ["--json", "{t}/missing.json"], "load_json_path"),
    (lambda t: None, ["--queue", "{t}/missing.txt"], "queue"),
])
def test_bad_input_is_one_line_and_exit_2_and_nothing_written(tmp_path, capsys, make, argv, setting):
    work = tmp_path / "work"
    work.mkdir()
    make(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _run([a.format(t=work) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and setting in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_queue_reports_each_folder_and_goes_on_after_a_failure(dataset, tmp_path, capsys):
    second = tmp_path / "second"
    (second / "2_b").mkdir(parents=True)
    _picture(second / "2_b" / "x.png", (96, 96), 6)
    queue = tmp_path / "queue.txt"
    queue.write_text(f"# reports\n{dataset}\n{tmp_path / 'gone'}\n\"{second}\"\n", encoding="utf-8")
    out_dir = tmp_path / "reports"
    assert _run(["--queue", queue, "--save_to", f"{out_dir}{os.sep}"]) == 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["data_report.png", "data_report.txt", "second_report.png",
                                                         "second_report.txt"]
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'gone'}" in err and "1 of the queue's reports failed" in err


def test_tool_as_a_process_prints_one_line_on_bad_input(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "dataset_report.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "train_data_dir" in res.stderr and "Traceback" not in res.stderr


def test_help_names_the_defaults():
    text = TOOL.build_parser().format_help()
    for flag in ("--json", "--resolution", "--enable_bucket", "--no_bucket", "--bucket_no_upscale", "--repeats",
                 "--batch_size", "--max_token_length", "--duplicate_distance", "--save_to", "--queue", "--popup"):
        assert flag in text
    assert dataclasses.is_dataclass(TrainConfig)


# ------------------------------------------------------------------------------------------- the popups
def _wizard(answers, **hooks):
    from ArgsList import ArgStore
    from popups.asker import ScriptedAsker
    from popups.training_flow import TrainingWizard

    asker = ScriptedAsker(answers)
    store = TrainingWizard(asker, ArgStore(), **hooks).run()
    return store, asker


def _wizard_answers(tmp_path, data, **more):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not read by the wizard")
    answers = {"base_model": str(model), "img_folder": str(data), "output_folder": str(tmp_path / "out")}
    answers.update(more)
    return answers


def test_the_wizard_offers_the_report_after_the_image_folder(dataset, tmp_path, monkeypatch):
    from popups import gpu_memory

    monkeypatch.setattr(gpu_memory, "probe_gpu", lambda: None)
    before = tree_digest(dataset)
    shown = []
    store, asker = _wizard(_wizard_answers(tmp_path, dataset, dataset_report=True), show_picture=shown.append)
    keys = asker.keys
    assert keys.index("img_folder") < keys.index("dataset_report") < keys.index("use_reg")
    assert store is not None and store.img_folder == str(dataset)
    told = [text for title, text, _ in asker.told if title == "Dataset report"]
    assert len(told) == 1 and "subset 4_thing: 5 images x 4 repeats" in told[0] and "no caption" in told[0]
    assert len(shown) == 1 and shown[0].endswith("data_report.png") and shown[0] in told[0]
    with Image.open(shown[0]) as picture:
        assert picture.format == "PNG"
    assert not Path(shown[0]).resolve().is_relative_to(dataset.resolve())
    assert tree_digest(dataset) == before


def test_the_wizard_makes_no_report_unless_asked(dataset, tmp_path, monkeypatch):
    from popups import gpu_memory
    from popups.dataset_check import make_report_picture

    monkeypatch.setattr(gpu_memory, "probe_gpu", lambda: None)
    made = []

    def make_report(store, progress):
        made.append(store.img_folder)
        return make_report_picture(store, progress)

    _, asker = _wizard(_wizard_answers(tmp_path, dataset), make_report=make_report, show_picture=made.append)
    assert "dataset_report" in asker.keys and made == []  # closing the window: no
    assert asker.questions("dataset_report")[0].help


def test_report_popup_builds_the_tools_arguments(dataset, tmp_path):
    from popups.asker import CANCEL, ScriptedAsker
    from popups.dataset_report import ask_arguments

    asker = ScriptedAsker({"source": "folder", "train_data_dir": str(dataset), "resolution": 768,
                           "enable_bucket": False, "batch_size": 2})
    argv = ask_arguments(asker)
    assert argv == [str(dataset), "--resolution", "768", "--no_bucket", "--batch_size", "2", "--save_to",
                    str(tmp_path / "data_report.png")]
    TOOL.build_parser().parse_args(argv)
    assert "python scripts/dataset_report.py" in asker.questions("confirm")[0].details[1]
    for q in asker.asked:
        assert q.help and q.prompt and q.title == "Dataset report", q.key

    # loose images: repeats are asked; an existing report is replaced only after a yes
    (tmp_path / "loose_report.png").write_bytes(b"old")
    loose = dataset / "4_thing"
    asker = ScriptedAsker({"train_data_dir": str(loose), "repeats": 6, "save_to": str(tmp_path / "loose_report.png"),
                           "overwrite": True})
    argv = ask_arguments(asker)
    assert argv[-5:] == ["--repeats", "6", "--save_to", str(tmp_path / "loose_report.png"), "--overwrite"]

    settings = tmp_path / "train.json"
    settings.write_text("{}", encoding="utf-8")
    argv = ask_arguments(ScriptedAsker({"source": "json", "json": str(settings)}))
    assert argv == ["--json", str(settings), "--save_to", str(tmp_path / "train_report.png")]
    assert ask_arguments(ScriptedAsker({"source": "folder", "train_data_dir": CANCEL})) is None


def test_report_popup_runs_the_tool(dataset, tmp_path, monkeypatch, capsys):
    import popups
    from popups.asker import ScriptedAsker

    asker = ScriptedAsker({"train_data_dir": str(dataset), "resolution": 96, "enable_bucket": False,
                           "save_to": str(tmp_path / "r.png")})
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    assert _run(["--popup"]) == 0
    assert (tmp_path / "r.png").is_file() and (tmp_path / "r.txt").is_file()
    assert "resolution 96" in capsys.readouterr().out
