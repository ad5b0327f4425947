"""WD14 tagging (scripts/tag_images.py) with a tiny ONNX tagger built in the test (tests/wd14_synth.py):
preprocessing, thresholds and MCut, names and order, the write rules, queues, the frequency report,
bad input (one line, exit 2, nothing written), the offline hub errors, and the popup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from popups.asker import ScriptedAsker
from sd_scripts.data.tag_selection import TagSettings, TagVocabulary, choose_tags
from sd_scripts.data.wd14_tagger import Label, mcut_threshold, prepare_image, read_labels
from tests import wd14_synth as synth
from tests.helpers import load_tool, run_tool

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def run(argv, capsys):
    return run_tool("tag_images", argv, capsys)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return synth.save_tagger(tmp_path_factory.mktemp("tagger") / "wd14")


def _images(folder: Path, **colours) -> Path:
    """``name=(colour, (w, h))`` PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (colour, size) in colours.items():
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return folder


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tags(probs: dict[str, float], threshold=0.35, character=0.35, **kw) -> list[str]:
    labels = [Label(n, c) for n, c in synth.LABELS]
    settings = TagSettings(general_threshold=threshold, character_threshold=character, **kw)
    vector = np.array([probs[n] for n in synth.NAMES], dtype=np.float32)
    return [t for t, _ in choose_tags(vector, TagVocabulary(labels, settings), settings)]


# ---------------------------------------------------------------- preprocessing


def test_prepare_image_pads_on_white_resizes_and_turns_to_bgr():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    arr = prepare_image(img, 4)
    assert arr.shape == (4, 4, 3) and arr.dtype == np.float32
    assert (arr[0] == 255).all() and (arr[3] == 255).all()  # one white row above and below: centred
    assert arr[1, 0].tolist() == [30.0, 20.0, 10.0]  # BGR, 0-255
    small = prepare_image(Image.new("RGB", (8, 8), (200, 100, 0)), 4)
    assert small.shape == (4, 4, 3) and np.allclose(small, [0, 100, 200])
    big = prepare_image(Image.new("RGB", (3, 3), (1, 2, 3)), 6)  # smaller images are enlarged
    assert big.shape == (6, 6, 3) and np.allclose(big, [3, 2, 1])


def test_labels_and_mcut(tagger):
    labels = read_labels(str(tagger / "selected_tags.csv"))
    assert labels[0] == Label("general", 9) and labels[-1] == Label("kasane_teto_(utau)", 4) and len(labels) == 13
    assert mcut_threshold(np.array([0.9, 0.85, 0.3, 0.2])) == pytest.approx(0.575)
    assert mcut_threshold(np.array([0.5])) == 0.5


# ---------------------------------------------------------------- choosing tags


def test_thresholds_ratings_and_order():
    red = synth.RED
    # kohya's rule: a tag at exactly the threshold is kept; confidence order by default
    assert _tags(red) == ["1girl", "red_hair", "kasane_teto_(utau)", "solo", "^_^", "long_hair"]
    assert _tags(red, threshold=0.36) == ["1girl", "red_hair", "kasane_teto_(utau)", "solo", "^_^", "long_hair"]
    assert _tags(red, threshold=0.37) == ["1girl", "red_hair", "kasane_teto_(utau)", "solo", "^_^"]
    assert _tags(red, character=0.9) == ["1girl", "red_hair", "solo", "^_^", "long_hair"]
    assert _tags(red, order="alphabetical") == ["1girl", "^_^", "kasane_teto_(utau)", "long_hair", "red_hair", "solo"]
    assert _tags(red, order="model") == ["1girl", "solo", "red_hair", "^_^", "long_hair", "kasane_teto_(utau)"]
    assert _tags(red, character_first=True)[:2] == ["kasane_teto_(utau)", "1girl"]
    assert _tags(red, rating="first")[0] == "general" and _tags(synth.BLUE, rating="last")[-1] == "sensitive"
    assert "general" not in _tags(red) and "general" not in _tags(red, rating="first", undesired=("general",))


def test_mcut_thresholds():
    # general probabilities of the red image: .95 .90 | .60 .50 .36 .20 .05 -> the largest gap is .90 -> .60
    assert _tags(synth.RED, general_mcut=True, character=0.99) == ["1girl", "red_hair"]
    # characters: the gap .88 -> .10 gives 0.49; blue: .50 -> .02 gives 0.26, raised to the 0.15 floor -> kept
    assert _tags(synth.RED, threshold=0.99, character_mcut=True) == ["kasane_teto_(utau)"]
    assert _tags(synth.BLUE, threshold=0.99, character_mcut=True) == ["hatsune_miku"]
    low = dict(synth.BLUE, hatsune_miku=0.12)
    low["kasane_teto_(utau)"] = 0.01
    assert _tags(low, threshold=0.99, character_mcut=True) == []  # 0.065 -> floor 0.15: nothing


def test_names_replacements_undesired_and_first_tags():
    red = synth.RED
    assert _tags(red, remove_underscore=True) == ["1girl", "red hair", "kasane teto (utau)", "solo", "^_^", "long hair"]
    assert _tags(red, character_tag_expand=True, remove_underscore=True)[2:4] == ["kasane teto", "utau"]
    assert _tags(red, replacements=(("red hair", "crimson hair"), ("solo", ""), ("1girl", "1girl, woman"))) == \
        ["1girl", "woman", "crimson hair", "kasane_teto_(utau)", "^_^", "long_hair"]
    assert _tags(red, undesired=("solo", "*_hair")) == ["1girl", "kasane_teto_(utau)", "^_^"]
    assert _tags(red, always_first=("solo", "absent", "^_^"))[:3] == ["solo", "^_^", "1girl"]
    assert _tags(red, trigger_words=("mychar", "Solo"), always_first=("red_hair",))[:4] == \
        ["mychar", "Solo", "red_hair", "1girl"]
    with pytest.raises(Exception, match="general_threshold: must be a probability from 0 to 1"):
        TagSettings(general_threshold=1.5)


# ---------------------------------------------------------------- the command line, end to end


def _expected_caption(mean_bgr, **kw) -> str:
    return ", ".join(_tags(synth.expected(mean_bgr), **kw))


def test_tags_a_folder_bgr_padding_and_alpha(tagger, tmp_path, capsys):
    folder = _images(tmp_path / "10_x", red=(RED, (16, 16)), blue=(BLUE, (16, 16)), halfred=(RED, (16, 8)),
                     big=(BLUE, (40, 40)))
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(folder / "clear.png")  # fully transparent: white
    (folder / "broken.jpg").write_bytes(b"not an image")
    images = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    code, out, err = run([folder, "--model_dir", tagger, "--batch_size", "2"], capsys)
    assert code == 0, err
    captions = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert captions["red"] == _expected_caption((0, 0, 1)) + "\n"
    assert captions["blue"] == captions["big"] == _expected_caption((1, 0, 0)) + "\n"
    assert captions["halfred"] == _expected_caption((0.5, 0.5, 1)) + "\n"  # padded with white, centred
    assert captions["clear"] == _expected_caption((1, 1, 1)) + "\n"
    assert captions["red"].startswith("1girl, red_hair, kasane_teto_(utau)")
    assert "broken" not in captions and "skipped" in err and "broken.jpg" in err
    assert {name: (folder / name).read_bytes() for name in images} == images  # images untouched
    assert "wrote 5 captions; 1 images could not be read" in out
    assert "Tag frequencies:" in out and "      5  1girl" in out


def test_existing_captions_skip_append_overwrite_and_dry_run(tagger, tmp_path, capsys):
    folder = _images(tmp_path / "imgs", red=(RED, (16, 16)), blue=(BLUE, (16, 16)))
    (folder / "red.txt").write_bytes(b"my own, Red_Hair\r\nsecond line\r\n")
    (folder / "blue.txt").write_bytes(b"  \n")  # empty: not a caption to keep
    before = _snapshot(folder)
    code, out, _ = run([folder, "--model_dir", tagger, "--dry_run", "--trigger_words", "mychar"], capsys)
    assert code == 0 and _snapshot(folder) == before
    assert "1 of 2 images already have a caption and are left alone" in out
    assert f"{folder / 'blue.txt'}: mychar, " in out and "would write 1 captions (dry run: nothing written)" in out
    code, out, _ = run([folder, "--model_dir", tagger, "--trigger_words", "mychar"], capsys)
    assert code == 0 and (folder / "red.txt").read_bytes() == before["red.txt"]
    assert (folder / "blue.txt").read_text(encoding="utf-8") == "mychar, " + _expected_caption((1, 0, 0)) + "\n"
    code, out, _ = run([folder, "--model_dir", tagger, "--append_tags", "--trigger_words", "mychar"], capsys)
    assert code == 0
    assert (folder / "red.txt").read_bytes() == \
        b"mychar, my own, Red_Hair, 1girl, kasane_teto_(utau), solo, ^_^, long_hair\r\nsecond line\r\n"
    assert "(added to existing captions)" in out
    code, _, _ = run([folder, "--model_dir", tagger, "--overwrite", "--tag_order", "alphabetical"], capsys)
    assert (folder / "red.txt").read_text(encoding="utf-8") == _expected_caption((0, 0, 1), order="alphabetical") + "\n"
    code, out, _ = run([folder, "--model_dir", tagger], capsys)
    assert code == 0 and "nothing to tag" in out


def test_recursive_queue_extension_and_fixed_batch_model(tmp_path, capsys):
    v3 = synth.save_tagger(tmp_path / "v3", batch=1, input_name="input", output_name="output")
    root = tmp_path / "data"
    _images(root / "10_a", red=(RED, (16, 16)), blue=(BLUE, (16, 16)), more=(RED, (20, 10)))
    _images(root / "3_b" / "deep", blue=(BLUE, (16, 16)))
    other = _images(tmp_path / "other", red=(RED, (16, 16)))
    listing = tmp_path / "queue.txt"
    listing.write_text("# folders to tag\nother\n", encoding="utf-8")
    code, out, err = run([root, "--queue", listing, "--model_dir", v3, "--recursive", "--caption_extension", ".tags",
                          "--batch_size", "4", "--frequency_tags"], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.tags"))
    assert written == ["data/10_a/blue.tags", "data/10_a/more.tags", "data/10_a/red.tags", "data/3_b/deep/blue.tags",
                       "other/red.tags"]
    assert (root / "10_a" / "red.tags").read_text(encoding="utf-8") == _expected_caption((0, 0, 1)) + "\n"
    assert (other / "red.tags").read_text(encoding="utf-8") == _expected_caption((0, 0, 1)) + "\n"
    assert "wrote 5 captions" in out and "most frequent" not in out


def test_kohya_model_dir_layout_and_kohya_flags(tagger, tmp_path, capsys):
    import shutil

    shutil.copytree(tagger, tmp_path / "wd14_tagger_model" / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    folder = _images(tmp_path / "imgs", red=(RED, (16, 16)))
    code, _, err = run([folder, "--onnx", "--repo_id", "SmilingWolf/wd-v1-4-convnext-tagger-v2", "--model_dir",
                        tmp_path / "wd14_tagger_model", "--thresh", "0.5", "--caption_extention", ".cap",
                        "--use_rating_tags_as_last_tag", "--character_tags_first", "--remove_underscore",
                        "--max_data_loader_n_workers", "1", "--pin_memory", "--always_first_tags", "solo"], capsys)
    assert code == 0, err
    assert (folder / "red.cap").read_text(encoding="utf-8") == "solo, kasane teto (utau), 1girl, red hair, ^_^, general\n"


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _mismatched(folder: Path) -> Path:
    return synth.save_tagger(folder, labels=synth.LABELS[:5], n_outputs=len(synth.LABELS))


def _nchw(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 16, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n1,a,0,1\n", encoding="utf-8")
    return folder


def _bad_csv(folder: Path, tagger: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    (folder / "selected_tags.csv").write_text("id,tag\n1,a\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "train_data_dir: folder"),
    (["{empty}"], "no images"),
    (["{nested}"], "add --recursive"),
    ([], "train_data_dir: missing"),
    (["{imgs}", "--model_dir", "{missing}"], "model_dir:"),
    (["{imgs}", "--model_dir", "{empty}"], "has no model.onnx and selected_tags.csv"),
    (["{imgs}", "--model_dir", "{mismatched}"], "lists 5"),
    (["{imgs}", "--model_dir", "{nchw}"], "is not a WD14 tagger"),
    (["{imgs}", "--model_dir", "{bad_csv}"], "tag_id,name,category,count"),
    (["{imgs}", "--thresh", "1.5"], "thresh: must be a probability from 0 to 1"),
    (["{imgs}", "--general_threshold", "-0.1"], "general_threshold"),
    (["{imgs}", "--character_threshold", "2"], "character_threshold"),
    (["{imgs}", "--batch_size", "0"], "batch_size"),
    (["{imgs}", "--max_data_loader_n_workers", "0"], "max_data_loader_n_workers"),
    (["{imgs}", "--append", "--overwrite"], "not both"),
    (["{imgs}", "--use_rating_tags", "--use_rating_tags_as_last_tag"], "not both"),
    (["{imgs}", "--caption_extension", ".png"], "image extension"),
    (["{imgs}", "--caption_extension", "txt"], "caption_extension"),
    (["{imgs}", "--tag_replacement", "a;b"], "tag_replacement"),
    (["{imgs}", "--repo_id", "not-a-repo"], "repo_id: 'not-a-repo' is not"),
    (["{imgs}", "--queue", "{missing}"], "queue"),
    (["{imgs}", "--thresh", "x"], "invalid float"),
])
def test_bad_input(tagger, tmp_path, capsys, args, words):
    imgs = _images(tmp_path / "imgs", red=(RED, (16, 16)))
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "nested" / "sub", red=(RED, (16, 16)))
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "nested": tmp_path / "nested",
             "imgs": imgs, "mismatched": _mismatched(tmp_path / "mismatched"), "nchw": _nchw(tmp_path / "nchw"),
             "bad_csv": _bad_csv(tmp_path / "bad_csv", tagger)}
    before = _snapshot(tmp_path)
    argv = [a.format(**paths) for a in args]
    if "--model_dir" not in argv and "--repo_id" not in argv:
        argv += ["--model_dir", str(tagger)]
    if "x" in argv:
        with pytest.raises(SystemExit) as e:
            load_tool("tag_images").main(argv)
        code, err = e.value.code, capsys.readouterr().err
    else:
        code, _, err = run(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert _snapshot(tmp_path) == before


def test_device_cuda_without_a_cuda_provider(tagger, tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here")
    imgs = _images(tmp_path / "imgs", red=(RED, (16, 16)))
    code, _, err = run([imgs, "--model_dir", tagger, "--device", "cuda"], capsys)
    assert code == 2 and "device: cuda" in err and "onnxruntime-gpu" in err and not list(imgs.glob("*.txt"))


def _hub_env(home: Path, offline: bool = True) -> dict:
    env = dict(os.environ, HF_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def test_repo_id_offline_not_cached_names_the_setting_and_the_download(tmp_path):
    imgs = _images(tmp_path / "imgs", red=(RED, (16, 16)))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "tag_images.py"), str(imgs), "--repo_id",
                          "SmilingWolf/wd-vit-tagger-v3"], capture_output=True, text=True, env=_hub_env(tmp_path / "hf"),
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "repo_id: 'SmilingWolf/wd-vit-tagger-v3' is not in the Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "hf download SmilingWolf/wd-vit-tagger-v3 model.onnx selected_tags.csv" \
        in lines[0] and "--model_dir" in lines[0]
    assert not list(imgs.glob("*.txt"))


def test_repo_id_from_the_cache_works_offline(tagger, tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-tagger" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        (snapshot / name).write_bytes((tagger / name).read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    imgs = _images(tmp_path / "imgs", red=(RED, (16, 16)))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "tag_images.py"), str(imgs), "--repo_id",
                          "someone/tiny-tagger"], capture_output=True, text=True, env=_hub_env(tmp_path / "hf"),
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert (imgs / "red.txt").read_text(encoding="utf-8") == _expected_caption((0, 0, 1)) + "\n"


# ---------------------------------------------------------------- help and popup


def test_help_says_where_the_defaults_differ_from_kohya():
    text = load_tool("tag_images").build_parser().format_help()
    assert "never overwritten" in text and "kohya always replaced" in text and "wd-v1-4-convnext-tagger-v2" in text


def test_popup_asks_and_runs_the_tool(tagger, tmp_path, capsys, monkeypatch):
    import popups

    root = tmp_path / "data"
    _images(root / "10_a", red=(RED, (16, 16)), blue=(BLUE, (16, 16)))
    (root / "10_a" / "red.txt").write_text("mine", encoding="utf-8")
    script = {"train_data_dir": str(root), "repo_id": "folder", "model_dir": [str(tmp_path), str(tagger)],
              "general_threshold": 0.5, "trigger_words": "mychar", "existing": "append"}
    asker = ScriptedAsker(script)
    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: asker)
    code, out, err = run(["--popup"], capsys)
    assert code == 0, err
    assert "no model.onnx and selected_tags.csv" in asker.questions("model_dir")[1].error
    assert asker.keys[:3] == ["train_data_dir", "repo_id", "model_dir"]  # images only in subfolders: recursive
    for q in asker.asked:
        assert q.help and q.prompt and q.title, q.key
    assert (root / "10_a" / "red.txt").read_text(encoding="utf-8").startswith("mychar, mine, 1girl, red hair")
    assert (root / "10_a" / "blue.txt").read_text(encoding="utf-8").startswith("mychar, blue sky, solo")
    argv = popups.tag_images.flow(ScriptedAsker({"train_data_dir": str(root / "10_a"), "repo_id": "other",
                                                 "other_repo": "me/my-tagger", "dry_run": True}))
    assert argv == [str(root / "10_a"), "--repo_id", "me/my-tagger", "--general_threshold", "0.35",
                    "--character_threshold", "0.85", "--remove_underscore", "--dry_run"]


def test_the_example_queue_file(tagger, capsys):
    dataset = ROOT / "examples" / "quickstart" / "dataset"
    before = _snapshot(dataset)
    code, out, err = run(["--queue", ROOT / "examples" / "tag_queue.txt", "--model_dir", tagger, "--overwrite",
                          "--dry_run", "--trigger_words", "sks shape"], capsys)
    assert code == 0, err
    assert "would write 8 captions (dry run: nothing written)" in out and "00_red_circle.txt: sks shape, " in out
    code, out, err = run(["--queue", ROOT / "examples" / "tag_queue.txt", "--dry_run"], capsys)
    assert code == 0 and "8 of 8 images already have a caption" in out and "nothing to tag" in out
    assert _snapshot(dataset) == before


def test_a_caption_that_is_not_utf8_is_kept_and_stops_an_append(tagger, tmp_path, capsys):
    folder = _images(tmp_path / "imgs", red=(RED, (16, 16)), blue=(BLUE, (16, 16)))
    (folder / "red.txt").write_bytes("caf\u00e9".encode("latin-1"))
    code, out, _ = run([folder, folder, "--model_dir", tagger], capsys)  # the folder twice: tagged once
    assert code == 0 and "wrote 1 captions" in out and (folder / "red.txt").read_bytes() == b"caf\xe9"
    (folder / "blue.txt").unlink()
    before = _snapshot(folder)
    code, _, err = run([folder, "--model_dir", tagger, "--append"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "red.txt' is not UTF-8 text" in err
    assert _snapshot(folder) == before
