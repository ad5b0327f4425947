"""The tag occurrence list: order, encoding, the same counts as the engine's ss_tag_frequency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ArgsList import ArgStore
from frontend.tag_list import format_tag_list, merge_tag_counts, read_caption_tags, write_tag_list
from frontend.training import write_side_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_by_count_with_ties_in_first_seen_order():
    counts = merge_tag_counts({
        "5_a": {"zebra": 2, "apple": 1, "mango": 3},
        "3_b": {"apple": 1, "kiwi": 2, "banana": 1},
    })
    assert list(counts.items()) == [("zebra", 2), ("apple", 2), ("mango", 3), ("kiwi", 2), ("banana", 1)]
    text = format_tag_list(counts, "my_lora")
    lines = text.splitlines()
    assert lines[0] == "Tags in the captions used to train my_lora (5 tags, most used first):"
    assert lines[1:] == ["[3] mango", "[2] zebra", "[2] apple", "[2] kiwi", "[1] banana"]
    assert text.endswith("\n")


def test_alphabetical_ignores_case():
    text = format_tag_list({"b": 1, "Alpha": 5, "apple": 2, "Zed": 1, "éclair": 1}, "x", alphabetical=True)
    assert text.splitlines()[0].endswith("(5 tags, alphabetically):")
    assert text.splitlines()[1:] == ["[5] Alpha", "[2] apple", "[1] b", "[1] Zed", "[1] éclair"]


def _captions(tmp_path):
    root = tmp_path / "imgs"
    (root / "10_cat").mkdir(parents=True)
    (root / "2_dog").mkdir()
    (root / "10_cat" / "1.txt").write_text("cat,  black cat , 猫, café\n", encoding="utf-8")
    (root / "10_cat" / "2.TXT").write_text("Cat, sitting,,  猫 ", encoding="utf-8")
    (root / "10_cat" / "3.txt").write_bytes("\ufeffcat, café".encode("utf-8"))  # a BOM is not part of a tag
    (root / "10_cat" / ".hidden.txt").write_text("ghost", encoding="utf-8")
    (root / "10_cat" / "4.caption").write_text("other extension", encoding="utf-8")
    (root / "2_dog" / "1.txt").write_text("dog, sitting", encoding="utf-8")
    (root / "loose.txt").write_text("not in a repeats folder", encoding="utf-8")
    return root


def test_captions_read_as_utf8_split_and_stripped(tmp_path):
    frequency = read_caption_tags(str(_captions(tmp_path)), ".txt")
    assert frequency == {
        "10_cat": {"cat": 3, "black cat": 1, "猫": 2, "café": 2, "sitting": 1},
        "2_dog": {"dog": 1, "sitting": 1},
    }
    counts = merge_tag_counts(frequency)
    path = write_tag_list(str(tmp_path / "out" / "lora.txt"), counts, "lora")
    raw = open(path, "rb").read()
    assert "[2] 猫".encode("utf-8") in raw and b"\r\n" not in raw
    assert raw.decode("utf-8").splitlines()[1:3] == ["[3] cat", "[2] 猫"]


def test_same_counts_as_the_engine_dataset_scan(tmp_path):
    pytest.importorskip("PIL")
    layout = pytest.importorskip("sd_scripts.data.dataset_layout")
    from PIL import Image

    from frontend.settings_map import to_train_config

    root = _captions(tmp_path)
    for folder in ("10_cat", "2_dog"):
        for stem in ("1", "2", "3"):
            caption = root / folder / f"{stem}.txt"
            if caption.exists() or (root / folder / f"{stem}.TXT").exists():
                Image.new("RGB", (64, 64), "red").save(root / folder / f"{stem}.png")
    if (root / "10_cat" / "2.TXT").exists():
        os.rename(root / "10_cat" / "2.TXT", root / "10_cat" / "2.txt")
    store = ArgStore(img_folder=str(root), output_folder=str(tmp_path / "out"), base_model="x/y",
                     train_resolution=64, min_bucket_resolution=64, max_bucket_resolution=128)
    config = to_train_config(store, has_cuda=False, has_xformers=False).config
    plan = layout.scan_dataset(config)
    assert merge_tag_counts(plan.tag_frequency) == merge_tag_counts(read_caption_tags(str(root), ".txt"))


def test_side_files_beside_the_lora(tmp_path):
    store = ArgStore(output_folder=str(tmp_path / "out"), change_output_name="named", test_seed=5,
                     sort_tag_occurrence_alphabetically=True, save_json_folder="/somewhere", load_json_path="/x.json")
    config = SimpleNamespace(output_dir=str(tmp_path / "out"), output_name="named")
    plan = SimpleNamespace(dataset=SimpleNamespace(tag_frequency={"1_a": {"b": 1, "a": 2}}))
    messages = []
    write_side_files(SimpleNamespace(store=store, config=config), plan, say=messages.append)
    settings = json.load(open(tmp_path / "out" / "named_settings.json", encoding="utf-8"))
    assert settings["test_seed"] == 5 and settings["save_json_folder"] is None and settings["load_json_path"] is None
    assert open(tmp_path / "out" / "named.txt", encoding="utf-8").read().splitlines()[1:] == ["[2] a", "[1] b"]
    assert len(messages) == 2
    # off when asked
    store = store.replace(tag_occurrence_txt_file=False, change_output_name="other")
    config = SimpleNamespace(output_dir=str(tmp_path / "out"), output_name="other")
    write_side_files(SimpleNamespace(store=store, config=config), plan, say=messages.append)
    assert not (tmp_path / "out" / "other.txt").exists()


@pytest.mark.slow
def test_tag_list_matches_the_lora_metadata_after_a_real_training(tmp_path, tiny_sd1_diffusers):
    from PIL import Image
    from safetensors import safe_open

    root = _captions(tmp_path)
    os.rename(root / "10_cat" / "2.TXT", root / "10_cat" / "2.txt")
    for folder in ("10_cat", "2_dog"):
        for caption in (root / folder).glob("[0-9].txt"):
            Image.new("RGB", (64, 64), (200, 40, 40)).save(caption.with_suffix(".png"))
    out = tmp_path / "out"
    args = ["--base_model", str(tiny_sd1_diffusers), "--img_folder", str(root), "--output_folder", str(out),
            "--change_output_name", "tags", "--train_resolution", "64", "--min_bucket_resolution", "64",
            "--max_bucket_resolution", "128", "--bucket_reso_steps", "32", "--max_steps", "2", "--net_dim", "4",
            "--alpha", "2", "--clip_skip", "1", "--tokenizer_cache_dir", str(tiny_sd1_diffusers / "tokenizer")]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    import torch

    if not torch.cuda.is_available():  # the 2023 defaults (fp16, AdamW8bit) fall back, said in one line
        assert len([line for line in run.stdout.splitlines() if "no CUDA GPU found" in line]) == 1
    lora = out / "tags.safetensors"
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    frequency = json.loads(metadata["ss_tag_frequency"])
    listed = {}
    for line in (out / "tags.txt").read_text(encoding="utf-8").splitlines()[1:]:
        count, tag = line.split("] ", 1)
        listed[tag] = int(count[1:])
    assert listed == merge_tag_counts(frequency)
    settings = json.loads((out / "tags_settings.json").read_text(encoding="utf-8"))
    assert settings["net_dim"] == 4 and settings["max_steps"] == 2 and settings["mixed_precision"] in ("no", "fp16")
