"""kohya's fine-tuning datasets: ``in_json`` / ``dataset_repeats`` and ``[[datasets.subsets]] metadata_file``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.dataset_layout import scan_dataset
from sd_scripts.core.errors import UserError
from tests.helpers import make_dataset, tiny_config, tree_digest

METADATA = {
    "img00": {"caption": "a red circle", "tags": "sks shape, red", "train_resolution": [64, 64]},
    "img01": {"tags": "sks shape, green"},
    "img02.png": {"caption": "a blue circle"},
    "img03": {},
}


def cfg(**kw) -> TrainConfig:
    base = dict(resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def ft(tmp_path) -> Path:
    """tmp/ft: images/img00..03.png (with .txt caption files that must not be read) and meta.json."""
    root = tmp_path / "ft"
    make_dataset(root, folder="images", count=4, captions=True)
    (root / "meta.json").write_text(json.dumps(METADATA), encoding="utf-8")
    return root


def captions_of(plan) -> dict[str, str]:
    return {os.path.basename(r.path): r.caption for r in plan.images}


def one_line(exc_info, *needles) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def write_toml(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- lookup


def test_in_json_finds_images_by_key_and_in_the_image_folder(ft, tmp_path, monkeypatch):
    elsewhere = make_dataset(tmp_path / "other", folder="more", count=1, captions=False) / "more" / "img00.png"
    metadata = dict(METADATA)
    metadata[str(elsewhere)] = {"caption": "absolute"}
    metadata[os.path.join("ft", "images", "img01.png")] = {"caption": "relative to the working folder"}
    (ft / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images")))
    paths = [r.path for r in plan.images]
    assert paths[:4] == [str(ft / "images" / f"img0{i}.png") for i in range(4)]  # <dir>/<key><ext>, <dir>/<key>
    assert paths[4] == str(elsewhere)
    assert paths[5] == os.path.join("ft", "images", "img01.png")
    assert str(tmp_path / "other" / "more") in plan.roots  # no output or cache among those images either
    assert plan.num_train_images == 6 and plan.subsets[0].name == "meta.json"


def test_captions_come_from_caption_and_tags_never_from_caption_files(ft):
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images")))
    assert captions_of(plan) == {
        "img00.png": "a red circle,sks shape, red",  # kohya: caption + caption_separator + tags
        "img01.png": "sks shape, green",  # the tags alone
        "img02.png": "a blue circle",
        "img03.png": "",
    }
    assert [r.caption_source for r in plan.images] == ["metadata", "metadata", "metadata", "none"]
    assert any("1 of 4 entries" in w and "no caption or tags" in w for w in plan.warnings)
    # tag frequency counts the "tags" of the entries, under the metadata file's name (as kohya records it)
    assert plan.tag_frequency == {"meta.json": {"sks shape": 2, "red": 1, "green": 1}}
    assert plan.dataset_dirs == {"meta.json": {"n_repeats": 1, "img_count": 4}}

    wild = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), enable_wildcard=True,
                            caption_separator=";"))
    assert captions_of(wild)["img00.png"] == "a red circle;sks shape, red"


def test_multi_line_caption_with_wildcard_gets_the_tags_on_every_line(ft):
    (ft / "meta.json").write_text(json.dumps({"img00": {"caption": "one\ntwo", "tags": "x"}}), encoding="utf-8")
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), enable_wildcard=True))
    assert plan.images[0].caption == "one,x\ntwo,x"


def test_jsonl_metadata(ft):
    lines = [{"image_path": "img00.png", "caption": "first", "tags": "a, b"}, {"image_path": "img01", "tags": "c"}]
    (ft / "meta.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    plan = scan_dataset(cfg(in_json=str(ft / "meta.jsonl"), train_data_dir=str(ft / "images")))
    assert captions_of(plan) == {"img00.png": "first,a, b", "img01.png": "c"}


# ------------------------------------------------------------------------------------ repeats and routes


def test_dataset_repeats_and_num_repeats(ft, tmp_path):
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), dataset_repeats=3))
    assert plan.num_train_images == 12 and {r.repeats for r in plan.images} == {3}
    toml = write_toml(tmp_path / "d.toml", f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{ft / 'meta.json'}'\n"
                                           f"image_dir = '{ft / 'images'}'\nnum_repeats = 2\n")
    assert scan_dataset(cfg(dataset_config=str(toml))).num_train_images == 8
    # kohya: --dataset_repeats is the fallback of a subset without num_repeats
    toml.write_text(toml.read_text().replace("num_repeats = 2\n", ""), encoding="utf-8")
    assert scan_dataset(cfg(dataset_config=str(toml), dataset_repeats=5)).num_train_images == 20


def test_toml_and_in_json_agree(ft, tmp_path):
    by_json = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), dataset_repeats=2,
                               shuffle_caption=True, keep_tokens=1))
    # relative paths in the TOML are found beside it
    toml = write_toml(ft / "d.toml", "[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_extension = '.txt'\n"
                                     "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n"
                                     "image_dir = 'images'\nnum_repeats = 2\n")
    by_toml = scan_dataset(cfg(dataset_config=str(toml)))
    def key(plan):
        return [(os.path.realpath(r.path), r.caption, r.repeats, r.size, r.tags) for r in plan.images]

    assert key(by_json) == key(by_toml)
    assert by_json.tag_frequency == by_toml.tag_frequency and by_json.dataset_dirs == by_toml.dataset_dirs
    assert by_json.subsets[0].captions == by_toml.subsets[0].captions
    meta = by_toml.subsets[0].metadata()
    assert (meta["metadata_file"], meta["image_dir"], meta["num_repeats"]) == ("meta.json", "images", 2)
    assert "class_tokens" not in meta and "is_reg" not in meta


def test_fine_tuning_and_dreambooth_datasets_side_by_side(ft, tmp_path):
    db = make_dataset(tmp_path / "db", folder="3_dog", count=2)
    toml = write_toml(tmp_path / "d.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{db / '3_dog'}'\n"
                                           f"num_repeats = 3\nalpha_mask = true\n"
                                           f"[[datasets]]\nresolution = 128\n[[datasets.subsets]]\n"
                                           f"metadata_file = '{ft / 'meta.json'}'\nimage_dir = '{ft / 'images'}'\n"
                                           f"alpha_mask = true\ncaption_dropout_rate = 0.5\n")
    plan = scan_dataset(cfg(dataset_config=str(toml)))
    assert plan.num_train_images == 3 * 2 + 4
    assert plan.subsets[1].alpha_mask and plan.subsets[1].captions.caption_dropout_rate == 0.5
    from sd_scripts.data.dataset import TrainDataset

    meta = TrainDataset(plan, cfg(dataset_config=str(toml)), seed=1).datasets_metadata()
    assert [m["is_dreambooth"] for m in meta] == [True, False]


def test_validation_split_holds_out_fine_tuning_images(ft):
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), validation_split=0.5))
    assert len(plan.images) == 2 and len(plan.validation_images) == 2


def test_kohya_command_line_and_argstore_reach_the_engine(ft):
    from frontend.resolve import resolve_settings, validate_store
    from frontend.settings_map import to_train_config
    from sd_scripts.train_network import config_from_args

    config = config_from_args(["--in_json", str(ft / "meta.json"), "--dataset_repeats", "4"])
    assert (config.in_json, config.dataset_repeats) == (str(ft / "meta.json"), 4)
    store = resolve_settings({"in_json": str(ft / "meta.json"), "dataset_repeats": 4, "base_model": str(ft),
                              "output_folder": str(ft.parent / "out")}).store
    validate_store(store)  # no img_folder needed with in_json
    mapped = to_train_config(store, has_cuda=False, has_xformers=False).config
    assert (mapped.in_json, mapped.dataset_repeats, mapped.train_data_dir) == (str(ft / "meta.json"), 4, None)
    # without train_data_dir, the keys are paths or names in the metadata file's own folder
    (ft / "images" / "meta.json").write_text(json.dumps(METADATA), encoding="utf-8")
    plan = scan_dataset(cfg(in_json=str(ft / "images" / "meta.json"), dataset_repeats=mapped.dataset_repeats))
    assert plan.num_train_images == 16


# --------------------------------------------------------------------------------------------- errors


def _scan_error(config) -> UserError:
    with pytest.raises(UserError) as e:
        scan_dataset(config)
    return e


@pytest.mark.parametrize("metadata, needles", [
    (None, ["in_json", "does not exist", "nope.json"]),
    ('{"img00": {"caption": "a",}}', ["in_json", "not valid JSON", "line 1, column 27", "meta.json"]),
    ('["img00"]', ["in_json", "must hold a JSON object", "found a list"]),
    ('{"img00": "just text"}', ["in_json", "entry 'img00'", "must be an object"]),
    ('{"img00": {"caption": 5}}', ["in_json", "entry 'img00'", "text"]),
    ("{}", ["in_json", "no usable image entries", "meta.json"]),
    ('{"img00": {}, "lost": {}, "gone.png": {}}', ["in_json", "no image found for 2 of 3 entries", "'lost'",
                                                    "'gone.png'", "image_dir (train_data_dir with in_json)"]),
    (b"\xff\xfe{}", ["in_json", "not UTF-8"]),
])
def test_in_json_errors_are_one_line(ft, metadata, needles):
    path = ft / ("nope.json" if metadata is None else "meta.json")
    if isinstance(metadata, bytes):
        path.write_bytes(metadata)
    elif metadata is not None:
        path.write_text(metadata, encoding="utf-8")
    before = tree_digest(ft)
    e = _scan_error(cfg(in_json=str(path), train_data_dir=str(ft / "images")))
    one_line(e, *needles)
    assert e.value.setting == "in_json"
    assert tree_digest(ft) == before


def test_only_broken_images_name_in_json(ft):
    for p in (ft / "images").glob("*.png"):
        p.write_bytes(b"not a png")
    one_line(_scan_error(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"))),
             "in_json", "none of the images can be used")


@pytest.mark.parametrize("body, needles", [
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'nope.json'\n",
     ["dataset_config metadata_file", "'nope.json'", "does not exist"]),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\nimage_dir = '{ft}/nothing'\n",
     ["dataset_config image_dir", "does not exist"]),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{ft}/images'\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n",
     ["dataset_config", "mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file)"]),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{meta}'\nis_reg = true\n",
     ["dataset_config", "'is_reg'", "fine-tuning subset"]),
    ("[[datasets]]\nclass_tokens = 'sks'\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n",
     ["dataset_config", "'class_tokens' in [[datasets]] #1", "fine-tuning subset"]),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 5\n", ["dataset_config", "metadata_file", "quoted string"]),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{ft}/empty.json'\nimage_dir = '{ft}/images'\n",
     ["dataset_config metadata_file", "no usable image entries", "empty.json"]),
])
def test_dataset_config_errors_are_one_line(ft, tmp_path, body, needles):
    (ft / "empty.json").write_text("{}", encoding="utf-8")
    toml = write_toml(tmp_path / "d.toml", body.format(ft=ft, meta=ft / "meta.json"))
    before = tree_digest(ft)
    one_line(_scan_error(cfg(dataset_config=str(toml))), *needles)
    assert tree_digest(ft) == before


def test_general_dreambooth_keys_are_left_to_dreambooth_datasets(ft, tmp_path):
    toml = write_toml(tmp_path / "d.toml", f"[general]\nclass_tokens = 'sks'\ncaption_extension = '.caption'\n"
                                           f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{ft / 'meta.json'}'\n"
                                           f"image_dir = '{ft / 'images'}'\n")
    assert captions_of(scan_dataset(cfg(dataset_config=str(toml))))["img03.png"] == ""


def test_dataset_repeats_below_one_and_ignored_settings(ft):
    one_line(_scan_error(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"), dataset_repeats=0)),
             "dataset_repeats", "at least 1")
    plan = scan_dataset(cfg(in_json=str(ft / "meta.json"), train_data_dir=str(ft / "images"),
                            reg_data_dir=str(ft / "images")))
    assert any("reg_data_dir is ignored with in_json" in w for w in plan.warnings)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_on_in_json_end_to_end(tiny_sd1_diffusers, ft, tmp_path):
    from safetensors import safe_open

    from sd_scripts.training.preflight import preflight
    from sd_scripts.training.loop import train

    before = tree_digest(ft)
    config = tiny_config(tiny_sd1_diffusers, ft / "images", tmp_path / "out", in_json=str(ft / "meta.json"),
                         dataset_repeats=2, max_train_steps=2, cache_latents=True, cache_latents_to_disk=True)
    plan = preflight(config)
    assert plan.summary[0] == "dataset: 4 training image(s) in 1 folder(s), 8 with repeats; 1 without a caption"
    result = train(config, plan=plan)
    assert result.global_step == 2
    with safe_open(result.output_path, "pt") as f:
        md = f.metadata()
    assert json.loads(md["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(md["ss_tag_frequency"]) == {"meta.json": {"sks shape": 2, "red": 1, "green": 1}}
    assert md["ss_num_train_images"] == "8"
    assert any((tmp_path / "out" / ".latent_cache").iterdir())
    assert tree_digest(ft) == before, "the images and the metadata file must not be modified"


@pytest.mark.slow
def test_main_py_trains_on_in_json(tiny_sd1_single_file, ft, tmp_path, capsys):
    from safetensors import safe_open

    from frontend.app import run_main
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

    before = tree_digest(ft)
    out = tmp_path / "out"
    rc = run_main(["--base_model", str(tiny_sd1_single_file), "--tokenizer_cache_dir",
                   str(tiny_tokenizer_cache_dir(tiny_sd1_single_file)), "--in_json", str(ft / "meta.json"),
                   "--img_folder", str(ft / "images"), "--dataset_repeats", "2", "--output_folder", str(out),
                   "--train_resolution", "64", "--min_bucket_resolution", "64", "--max_bucket_resolution", "128",
                   "--net_dim", "4", "--alpha", "2", "--max_steps", "1", "--num_workers", "0", "--optimizer_type",
                   "AdamW", "--mixed_precision", "no", "--xformers", "false", "--tag_occurrence_txt_file", "true"])
    assert rc == 0, capsys.readouterr().err
    assert "8 with repeats" in capsys.readouterr().out
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 4}}
    assert "sks shape" in (out / "last.txt").read_text(encoding="utf-8")  # the tag list, from the metadata's tags
    assert tree_digest(ft) == before
