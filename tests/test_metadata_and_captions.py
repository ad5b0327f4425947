"""kohya's ``--metadata_*`` options (the LoRA's ``modelspec.*`` keys) and its caption options as settings.

Trained files carry the user's title, author, trigger phrase, thumbnail ...; the side tools keep them;
the caption options given as settings change the captions exactly as the same dataset-TOML keys do,
and a TOML value wins over the setting.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from sd_scripts.core.config import TrainConfig
from sd_scripts.files.lora_file import read_safetensors_metadata
from tests.helpers import make_dataset, tiny_config

SUBSET = "5_sks shape"
USER_KEYS = {
    "metadata_title": ("modelspec.title", "My Shape LoRA"),
    "metadata_author": ("modelspec.author", "Ada"),
    "metadata_description": ("modelspec.description", "draws sks shapes"),
    "metadata_license": ("modelspec.license", "CC-BY-4.0"),
    "metadata_tags": ("modelspec.tags", "shape, test"),
    "metadata_trigger_phrase": ("modelspec.trigger_phrase", "sks shape"),
    "metadata_usage_hint": ("modelspec.usage_hint", "weight 0.8"),
}


def _png_bytes(color=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("meta_data") / "data", count=2)


@pytest.fixture(scope="module")
def thumbnail(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("thumb") / "thumb.png"
    path.write_bytes(_png_bytes())
    return path


def _train(model, data, out, **overrides) -> dict[str, str]:
    from sd_scripts.training.loop import train

    config = tiny_config(model, data, out, max_train_steps=1, **overrides)
    return read_safetensors_metadata(train(config).output_path)


@pytest.fixture(scope="module")
def trained(tiny_sd1_diffusers, dataset, thumbnail, tmp_path_factory) -> Path:
    """One SD1 training with every metadata setting (and a timestep range); the LoRA file's path."""
    from sd_scripts.training.loop import train

    out = tmp_path_factory.mktemp("meta_out")
    values = {name: value for name, (_, value) in USER_KEYS.items()}
    config = tiny_config(tiny_sd1_diffusers, dataset, out, max_train_steps=1, metadata_thumbnail=str(thumbnail),
                         training_comment="first try", min_timestep=100, **values)
    return Path(train(config).output_path)


# --------------------------------------------------------------------------------------- metadata


def test_trained_file_carries_the_users_modelspec_keys(trained, thumbnail):
    md = read_safetensors_metadata(trained)
    for key, value in USER_KEYS.values():
        assert md[key] == value, key
    prefix = "data:image/png;base64,"
    assert md["modelspec.thumbnail"].startswith(prefix)
    assert base64.b64decode(md["modelspec.thumbnail"][len(prefix):]) == thumbnail.read_bytes()
    assert md["ss_output_name"] == "tiny" and md["ss_training_comment"] == "first try"
    assert md["modelspec.timestep_range"] == "100,1000"  # kohya: written when min/max_timestep is set
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_defaults_are_unchanged_when_unset(tiny_sd1_diffusers, dataset, tmp_path):
    md = _train(tiny_sd1_diffusers, dataset, tmp_path / "out")
    assert md["modelspec.title"] == "tiny"  # the output name, as before
    assert not {key for key, _ in USER_KEYS.values() if key != "modelspec.title"} & set(md)
    assert "modelspec.thumbnail" not in md and "modelspec.timestep_range" not in md
    assert md["ss_training_comment"] == "None"


def test_a_dataset_toml_records_kohyas_ss_datasets(tiny_sd1_diffusers, dataset, tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[general]\nresolution = 64\n\n[[datasets]]\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
                    f"  image_dir = '{(dataset / '5_sks shape').as_posix()}'\n  num_repeats = 3\n"
                    f"  class_tokens = 'sks shape'\n", encoding="utf-8")
    md = _train(tiny_sd1_diffusers, None, tmp_path / "out", dataset_config=str(toml), train_data_dir=None)
    (entry,) = json.loads(md["ss_datasets"])
    assert entry["is_dreambooth"] is True and entry["num_train_images"] == 6 and entry["batch_size_per_device"] == 2
    assert [s["num_repeats"] for s in entry["subsets"]] == [3] and entry["tag_frequency"]
    assert "ss_datasets" not in _train(tiny_sd1_diffusers, dataset, tmp_path / "out2")  # folders: kohya's flat keys


def test_no_metadata_keeps_only_what_kohya_keeps(tiny_sd1_diffusers, dataset, tmp_path):
    from sd_scripts.files.metadata import MINIMUM_KEYS

    md = _train(tiny_sd1_diffusers, dataset, tmp_path / "out", no_metadata=True, metadata_title="Kept",
                metadata_trigger_phrase="sks", training_comment="dropped")
    ss_keys = {k for k in md if k.startswith("ss_")}
    assert ss_keys <= set(MINIMUM_KEYS) and "ss_training_comment" not in md
    assert set(md) - ss_keys - {"sshs_model_hash", "sshs_legacy_hash"} == {k for k in md if k.startswith("modelspec.")}
    assert md["modelspec.title"] == "Kept" and md["modelspec.trigger_phrase"] == "sks"  # kohya writes modelspec always


def test_resize_keeps_the_users_keys(trained, tmp_path):
    from sd_scripts.networks.resize import resize_lora_file

    source = read_safetensors_metadata(trained)
    out = tmp_path / "small.safetensors"
    resize_lora_file(trained, out, new_rank=2)
    md = read_safetensors_metadata(out)
    for key in [k for k, _ in USER_KEYS.values()] + ["modelspec.thumbnail", "modelspec.architecture"]:
        assert md[key] == source[key], key
    assert md["ss_network_dim"] == "2" and md["ss_training_comment"].endswith("; first try")


def test_merge_is_titled_after_its_file_and_keeps_shared_keys(trained, tmp_path):
    from sd_scripts.files.lora_file import load_lora_file, save_lora_file
    from sd_scripts.networks.merge import merge_lora_files

    sd, md = load_lora_file(trained)
    other = tmp_path / "other.safetensors"
    save_lora_file(other, sd, dict(md, **{"modelspec.trigger_phrase": "round thing", "modelspec.author": "Bob",
                                          "modelspec.tags": "test, circle"}))
    out = tmp_path / "merged.safetensors"
    merge_lora_files([trained, other], [0.5, 0.5], out, concat=True)
    merged = read_safetensors_metadata(out)
    assert merged["modelspec.title"] == "merged"
    assert merged["modelspec.trigger_phrase"] == "sks shape, round thing"
    assert merged["modelspec.tags"] == "shape, test, circle"
    assert "modelspec.author" not in merged  # the sources disagree
    assert merged["modelspec.license"] == "CC-BY-4.0" and merged["modelspec.thumbnail"] == md["modelspec.thumbnail"]
    assert merged["modelspec.merged_from"] == f"{trained.name}, other.safetensors"


def test_thumbnail_data_url_is_stored_as_given_and_checked():
    from sd_scripts.files.user_metadata import check_metadata_settings, user_modelspec

    url = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode("ascii")
    assert user_modelspec(TrainConfig(metadata_thumbnail=url)) == {"modelspec.thumbnail": url}
    assert check_metadata_settings(TrainConfig(metadata_thumbnail=url)) == ([], [])
    errors, _ = check_metadata_settings(TrainConfig(metadata_thumbnail="data:image/png;base64,@@@"))
    assert len(errors) == 1 and str(errors[0]).startswith("metadata_thumbnail:")
    assert user_modelspec(TrainConfig(metadata_author="  ")) == {}  # blank means unset


def test_kohya_ss_gui_metadata_and_caption_fields_are_imported(tmp_path):
    from frontend.json_io import load_settings_file

    data = {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "LoRA_type": "Standard",
            "metadata_title": "GUI title", "metadata_author": "GUI author", "metadata_description": "",
            "metadata_license": "MIT", "metadata_tags": "a, b", "training_comment": "from the GUI",
            "additional_parameters": "--caption_prefix sks --secondary_separator ;;; --enable_wildcard "
                                     "--metadata_trigger_phrase 'sks shape' --caption_extention .cap"}
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    loaded = load_settings_file(str(path))
    values = loaded.values
    assert loaded.fmt == "kohya_ss" and not loaded.ignored
    assert (values["metadata_title"], values["metadata_author"], values["metadata_license"]) == ("GUI title", "GUI author", "MIT")
    assert values["metadata_tags"] == "a, b" and "metadata_description" not in values
    assert values["caption_prefix"] == "sks" and values["secondary_separator"] == ";;;"
    assert values["enable_wildcard"] is True and values["metadata_trigger_phrase"] == "sks shape"
    assert values["caption_extention"] == ".cap"


# --------------------------------------------------------------------------------------- captions

CAPTION_OPTIONS = {"caption_prefix": "masterpiece", "caption_suffix": "ending", "caption_separator": ",",
                   "keep_tokens_separator": "|||", "secondary_separator": ";;;", "enable_wildcard": True,
                   "shuffle_caption": True}


@pytest.fixture()
def caption_data(tmp_path) -> Path:
    data = make_dataset(tmp_path / "data", count=3)
    texts = ["sks shape ||| red;;;round, {big|small}, circle ||| the end", "sks shape, green, circle\nsecond line",
             "blue, {one|two|three}, square;;;box"]
    for i, text in enumerate(texts):
        (data / SUBSET / f"img{i:02d}.txt").write_text(text, encoding="utf-8")
    return data


def _captions(config, epochs=(1, 2, 3)) -> list[tuple[str, str]]:
    from sd_scripts.data.dataset import TrainDataset
    from sd_scripts.data.dataset_layout import scan_dataset

    ds = TrainDataset(scan_dataset(config), config, 7)
    out = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            batch = ds[i]
            out += [(Path(p).name, c) for p, c in zip(batch["image_paths"], batch["captions"])]
    return out


def _cli_config(data: Path, tmp_path: Path, argv: list[str]) -> TrainConfig:
    """The settings as main.py builds them from its command line."""
    from frontend.cli import parse_command_line
    from frontend.resolve import resolve_settings
    from frontend.settings_map import to_train_config

    base = ["--img_folder", str(data), "--output_folder", str(tmp_path / "out"), "--train_resolution", "64",
            "--min_bucket_resolution", "64", "--max_bucket_resolution", "128", "--batch_size", "2",
            "--test_seed", "7"]
    cli_values, _ = parse_command_line(base + argv)
    return to_train_config(resolve_settings(cli_values).store, has_cuda=False, has_xformers=False).config


def _cli_words(options: dict) -> list[str]:
    words = []
    for name, value in options.items():
        name = {"shuffle_caption": "shuffle_captions"}.get(name, name)  # ArgStore's name
        words += [f"--{name}", "true" if value is True else str(value)]
    return words


def _toml_value(value) -> str:
    return "true" if value is True else json.dumps(value)


def test_caption_settings_change_captions_exactly_as_the_toml_keys(caption_data, tmp_path):
    cli = _cli_config(caption_data, tmp_path, _cli_words(CAPTION_OPTIONS))
    plain = _cli_config(caption_data, tmp_path, [])
    toml = tmp_path / "ds.toml"
    general = "\n".join(f"{k} = {_toml_value(v)}" for k, v in CAPTION_OPTIONS.items())
    toml.write_text(f"[general]\n{general}\n\n[[datasets]]\n\n  [[datasets.subsets]]\n"
                    f"  image_dir = {json.dumps(str(caption_data / SUBSET))}\n  num_repeats = 5\n"
                    f"  class_tokens = \"sks shape\"\n", encoding="utf-8")
    from_toml = plain.replace(dataset_config=str(toml), train_data_dir=None)

    with_settings, with_toml, without = _captions(cli), _captions(from_toml), _captions(plain)
    assert with_settings == with_toml
    assert with_settings != without
    by_image: dict[str, set[str]] = {}
    for name, caption in with_settings:
        by_image.setdefault(name, set()).add(caption)
    for caption in by_image["img00.png"]:  # prefix and suffix in the fixed parts, ;;; tags written with ","
        assert caption.startswith("masterpiece sks shape, ") and caption.endswith(", the end ending")
        assert "red,round" in caption and ("big" in caption) != ("small" in caption) and "|||" not in caption
    lines = [("green" in c, "second line" in c) for c in by_image["img01.png"]]  # a random line of the file
    assert {(True, False), (False, True)} == set(lines)
    assert all("{" not in c and "square,box" in c for c in by_image["img02.png"])


def test_toml_values_win_over_the_caption_settings(caption_data, tmp_path):
    from sd_scripts.data.dataset_layout import scan_dataset

    other = make_dataset(tmp_path / "other", folder="imgs", count=1)
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
caption_suffix = "from general"

[[datasets]]

  [[datasets.subsets]]
  image_dir = {json.dumps(str(caption_data / SUBSET))}
  caption_prefix = "from subset"
  enable_wildcard = false

  [[datasets.subsets]]
  image_dir = {json.dumps(str(other / "imgs"))}
""", encoding="utf-8")
    config = _cli_config(caption_data, tmp_path, _cli_words(CAPTION_OPTIONS)).replace(dataset_config=str(toml))
    first, second = scan_dataset(config).subsets
    assert (first.captions.caption_prefix, first.captions.caption_suffix) == ("from subset", "from general")
    assert first.captions.enable_wildcard is False and second.captions.enable_wildcard is True
    assert (second.captions.caption_prefix, second.captions.caption_suffix) == ("masterpiece", "from general")
    assert second.captions.keep_tokens_separator == "|||" and second.captions.secondary_separator == ";;;"


def test_caption_extention_is_kohyas_old_spelling(caption_data, tmp_path):
    from frontend.cli import parse_command_line
    from frontend.resolve import resolve_settings
    from sd_scripts.data.dataset_layout import scan_dataset

    (caption_data / SUBSET / "img00.cap").write_text("from the cap file", encoding="utf-8")
    plan = scan_dataset(TrainConfig(train_data_dir=str(caption_data), resolution="64", min_bucket_reso=64,
                                    max_bucket_reso=128, caption_extention=".cap"))
    captions = {Path(r.path).name: r.caption for r in plan.images}
    assert captions["img00.png"] == "from the cap file" and captions["img01.png"] == "sks shape"  # class tokens
    assert any(w.startswith("caption_extention is kohya's old misspelling") for w in plan.warnings)
    resolved = resolve_settings(parse_command_line(["--caption_extention", ".cap"])[0])
    assert resolved.store.caption_extension == ".cap" and resolved.store.caption_extention is None
    assert any("caption_extention" in note for note in resolved.notes)


def test_wildcards_cannot_go_with_cached_text_encoder_outputs():
    from sd_scripts.models.families import check_family_settings

    config = TrainConfig(cache_text_encoder_outputs=True, network_train_unet_only=True, enable_wildcard=True)
    errors, _ = check_family_settings(config)
    assert [str(e) for e in errors] == ["cache_text_encoder_outputs: cannot be used with enable_wildcard (captions "
                                        "change during training); turn off enable_wildcard or cache_text_encoder_outputs"]
