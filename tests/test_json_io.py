"""JSON settings files: round trip, the 2023 tool's files, kohya_ss GUI files, skip list, bad files."""

from __future__ import annotations

import json
import os
import re

import pytest

from ArgsList import ArgStore
from frontend.json_io import load_settings_file, save_settings_json
from frontend.resolve import resolve_settings
from sd_scripts.core.errors import ConfigError, UserErrors


def _write(path, data) -> str:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return str(path)


def _non_default(info, tmp_path):
    """A valid value different from the default, for every kind of setting."""
    default = info.default
    if info.choices:
        return next(c for c in reversed(info.choices) if c != default)
    if info.kind == "bool":
        return not default
    if info.kind == "int":
        return (default or 0) + 3
    if info.kind == "float":
        return (default or 0) + 0.25
    if info.kind == "dict":
        return {"key": "value", "other": "1,2"}
    if info.kind == "list":
        return ["base_model", "img_folder"]
    if info.is_path:
        return str(tmp_path / f"{info.name} with space")
    return f"text for {info.name} ü"


def test_every_setting_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {info.name: _non_default(info, tmp_path) for info in ArgStore.settings()}
    values["save_json_only"] = False  # a saved file always trains when loaded
    store = ArgStore(**values)
    path = save_settings_json(store, str(tmp_path / "saved"), "round trip")
    data = json.load(open(path, encoding="utf-8"))
    assert list(data) == ArgStore.setting_names()
    loaded = load_settings_file(path)
    assert loaded.fmt == "lets" and loaded.ignored == []
    assert loaded.skip_list == values["json_load_skip_list"]
    for name, value in values.items():
        if name != "json_load_skip_list":
            assert loaded.values[name] == value, name
    # zero and false values survive the trip too
    zeros = ArgStore(keep_tokens=0, noise_offset=0.0, cache_latents=False, max_grad_norm=0.0, num_workers=0)
    loaded = load_settings_file(save_settings_json(zeros, str(tmp_path / "zeros")))
    assert (loaded.values["keep_tokens"], loaded.values["noise_offset"], loaded.values["cache_latents"],
            loaded.values["max_grad_norm"], loaded.values["num_workers"]) == (0, 0.0, False, 0.0, 0)


def test_saved_file_names(tmp_path):
    folder = str(tmp_path)
    first = save_settings_json(ArgStore(), folder, None, now=1_700_000_000)
    second = save_settings_json(ArgStore(), folder, None, now=1_700_000_000)
    named = save_settings_json(ArgStore(), folder, "my lora", now=1_700_000_000)
    assert re.fullmatch(r"config-\d{8}-\d{6}\.json", os.path.basename(first))
    assert os.path.basename(second) == os.path.basename(first)[:-5] + "-2.json"
    assert os.path.basename(named).endswith("-my lora.json")
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ 2023 files
def test_2023_tool_file_with_all_its_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    data = ArgStore().to_dict()
    data.update({
        "base_model": "C:/sd/model.safetensors", "img_folder": "imgs", "output_folder": "out",
        "save_json_folder": "C:/old/json", "save_json_only": True, "load_json_path": "C:/x.json",
        "net_dim": 64, "alpha": 32.0, "learning_rate": "5e-5", "warmup_lr_ratio": "0.05", "keep_tokens": "1",
        "optimizer_args": None, "lyco": True, "network_args": {"algo": "lora", "conv_dim": "8", "conv_alpha": "1"},
        "use_8bit_adam": False, "locon": False, "test_seed": 0,
        "list_of_json_to_run": None,  # leftover key every 2023 save wrote
        "sample_every_n_epoch": 2,  # the 2023 popups' misspelled key
        "save_at_n_epochs": 3,  # the name before February 2023
    })
    path = _write(tmp_path / "config-1681234567.123456.json", data)
    resolved = resolve_settings({"load_json_path": path})
    store = resolved.store
    assert resolved.warnings == []
    assert store.img_folder == str(tmp_path / "imgs")
    assert store.output_folder == str(tmp_path / "out")
    assert (store.net_dim, store.alpha, store.learning_rate, store.warmup_lr_ratio, store.keep_tokens) == (
        64, 32.0, 5e-5, 0.05, 1)
    assert store.optimizer_args is None and store.test_seed == 0
    assert store.network_args == {"algo": "lora", "conv_dim": "8", "conv_alpha": "1"} and store.lyco
    assert store.sample_every_n_epochs == 2 and store.save_every_n_epochs == 3
    # what describes the old session is not taken from the file
    assert store.save_json_folder is None and store.save_json_only is False
    assert store.load_json_path == path


def test_2023_leftover_list_key_with_a_value_is_reported(tmp_path):
    path = _write(tmp_path / "a.json", {"net_dim": 8, "list_of_json_to_run": ["x.json"], "my_note": "hi"})
    loaded = load_settings_file(path)
    assert loaded.ignored == ["list_of_json_to_run", "my_note"]
    assert loaded.warning().count("\n") == 0 and "list_of_json_to_run, my_note" in loaded.warning()


# ------------------------------------------------------------------------------------------ kohya_ss GUI
KOHYA_APRIL_2023 = {
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "v2": False, "v_parameterization": False, "logging_dir": "", "train_data_dir": "IMGS", "reg_data_dir": "",
    "output_dir": "OUT", "max_resolution": "768,512", "learning_rate": "0.0001", "lr_scheduler": "cosine",
    "lr_warmup": "10", "train_batch_size": 2, "epoch": "4", "save_every_n_epochs": "1", "mixed_precision": "bf16",
    "save_precision": "fp16", "seed": "1234", "num_cpu_threads_per_process": 2, "cache_latents": True,
    "caption_extension": "", "enable_bucket": True, "gradient_checkpointing": False, "full_fp16": False,
    "no_token_padding": False, "stop_text_encoder_training": 0, "xformers": True, "save_model_as": "safetensors",
    "shuffle_caption": True, "save_state": False, "resume": "", "prior_loss_weight": 1.0,
    "text_encoder_lr": "5e-5", "unet_lr": "0.0001", "network_dim": 64.0, "lora_network_weights": "",
    "color_aug": False, "flip_aug": True, "clip_skip": "2", "gradient_accumulation_steps": 1.0,
    "mem_eff_attn": False, "output_name": "kohya_lora", "model_list": "runwayml/stable-diffusion-v1-5",
    "max_token_length": "150", "max_train_epochs": "", "max_data_loader_n_workers": "1", "network_alpha": 32,
    "training_comment": "from the GUI", "keep_tokens": "0", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "",
    "persistent_data_loader_workers": False, "bucket_no_upscale": True, "random_crop": False,
    "bucket_reso_steps": 64.0, "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0,
    "optimizer": "Lion", "optimizer_args": "weight_decay=0.05 betas=0.9,0.98", "noise_offset": "0.05",
    "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 1, "sample_every_n_steps": 0,
    "sample_every_n_epochs": 1, "sample_sampler": "euler_a",
    "sample_prompts": "a photo of sks --n blurry --w 512 --h 512\nsks on a beach", "additional_parameters": "",
    "vae_batch_size": 0, "min_snr_gamma": 0, "down_lr_weight": "", "mid_lr_weight": "", "up_lr_weight": "",
    "block_lr_zero_threshold": "", "block_dims": "", "block_alphas": "", "conv_dims": "", "conv_alphas": "",
}


def test_kohya_ss_gui_file_is_converted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IMGS").mkdir()
    path = _write(tmp_path / "kohya.json", KOHYA_APRIL_2023)
    resolved = resolve_settings({"load_json_path": path})
    store = resolved.store
    assert resolved.loaded.fmt == "kohya_ss"
    assert store.base_model == "runwayml/stable-diffusion-v1-5"  # a hub id stays a hub id
    assert store.img_folder == str(tmp_path / "IMGS") and store.output_folder == str(tmp_path / "OUT")
    assert store.reg_img_folder is None and store.log_dir is None and store.resume is None
    assert (store.train_resolution, store.height_resolution) == (768, 512)
    assert store.learning_rate == 1e-4 and store.text_encoder_lr == 5e-5 and store.unet_lr == 1e-4
    assert store.warmup_lr_ratio == pytest.approx(0.10)  # 10 percent, not 10 x the steps
    assert (store.batch_size, store.num_epochs, store.save_every_n_epochs) == (2, 4, 1)
    assert store.test_seed == 1234 and store.optimizer_type == "Lion"
    assert store.optimizer_args == {"weight_decay": "0.05", "betas": "0.9,0.98"}
    assert store.mixed_precision == "bf16" and store.clip_skip == 2 and store.max_clip_token_length == 150
    assert store.net_dim == 64 and store.alpha == 32 and store.gradient_acc_steps == 1
    assert store.bucket_reso_steps == 64 and store.keep_tokens == 0 and store.noise_offset == 0.05
    assert store.caption_extension == ".txt"  # "" is unset, not an empty extension
    assert store.lyco is False and store.network_args == {"conv_dim": "8", "conv_alpha": "1"}
    assert store.sample_every_n_steps is None and store.sample_every_n_epochs == 1
    assert store.min_snr_gamma is None and store.vae_batch_size is None
    assert store.change_output_name == "kohya_lora" and store.training_comment == "from the GUI"
    assert open(store.sample_prompts, encoding="utf-8").read() == KOHYA_APRIL_2023["sample_prompts"] + "\n"
    assert not [n for n in os.listdir(tmp_path) if n not in ("IMGS", "kohya.json")]  # nothing written here
    # keys with no use here: one warning that lists them
    assert len(resolved.warnings) == 1
    assert resolved.warnings[0].endswith("ignored settings this trainer does not use: "
                                         "num_cpu_threads_per_process, model_list")


def test_kohya_ss_lycoris_types_and_newer_keys(tmp_path):
    data = dict(KOHYA_APRIL_2023)
    data.update({
        "LoRA_type": "LyCORIS/LoHa", "conv_dim": "4", "conv_alpha": "2.0", "use_cp": True, "xformers": "sdpa",
        "optimizer": "Adafactor", "optimizer_args": "", "max_train_epochs": "6", "max_bucket_reso": 1024,
        "min_bucket_reso": 256.0, "noise_offset_type": "Multires", "multires_noise_iterations": 6,
        "multires_noise_discount": 0.2, "sdxl": False, "network_dropout": 0, "use_wandb": True,
        "additional_parameters": "--max_grad_norm=0 --weighted_captions --some_flag 3", "rank_dropout": 0.1,
        "module_dropout": 0, "factor": -1, "num_cpu_threads_per_process": 0, "model_list": "",
    })
    loaded = load_settings_file(_write(tmp_path / "lycoris.json", data))
    values = loaded.values
    assert values["lyco"] is True
    assert values["network_args"] == {"algo": "loha", "conv_dim": "4", "conv_alpha": "2", "use_conv_cp": "True",
                                      "rank_dropout": "0.1"}
    assert values["xformers"] is False and values["optimizer_type"] == "AdaFactor"
    assert values["optimizer_args"] == {}  # an empty box in the GUI means no optimizer arguments
    assert values["num_epochs"] == 6
    assert (values["min_bucket_resolution"], values["max_bucket_resolution"]) == (256, 1024)
    assert "noise_offset" not in values and values["multires_noise_iterations"] == 6
    assert values["multires_noise_discount"] == 0.2 and values["log_with"] == "wandb"
    assert values["max_grad_norm"] == 0.0 and values["weighted_captions"] is True
    assert loaded.ignored == ["additional_parameters --some_flag"]


def test_kohya_ss_standard_lora_with_block_weights(tmp_path):
    data = dict(KOHYA_APRIL_2023, LoRA_type="Standard", down_lr_weight="sine", mid_lr_weight="0.5",
                block_dims="2,4,4,4,8,8,8,8,12,12,12,12,16,12,12,12,12,8,8,8,8,4,4,4,2")
    values = load_settings_file(_write(tmp_path / "blocks.json", data)).values
    assert values["lyco"] is False
    assert values["network_args"] == {"down_lr_weight": "sine", "mid_lr_weight": "0.5",
                                      "block_dims": data["block_dims"]}


def test_kohya_ss_sdxl_file_is_converted(tmp_path):
    """A GUI SDXL config (2024 layout): sdxl, the sdxl_-prefixed options, UNet-only, SDXL sizes."""
    data = dict(KOHYA_APRIL_2023, sdxl=True, sdxl_no_half_vae=True, sdxl_cache_text_encoder_outputs=True,
                network_train_unet_only=True, shuffle_caption=False, max_resolution="1024,1024", min_bucket_reso=256,
                max_bucket_reso=2048)
    loaded = load_settings_file(_write(tmp_path / "xl.json", data))
    values = loaded.values
    assert (values["sdxl"], values["no_half_vae"], values["cache_text_encoder_outputs"], values["unet_only"]) == \
        (True, True, True, True)
    assert (values["train_resolution"], values["min_bucket_resolution"], values["max_bucket_resolution"]) == \
        (1024, 256, 2048)
    assert not [key for key in loaded.ignored if "sdxl" in key]
    # with the SDXL box unticked the GUI ignores its SDXL options, and so do we (listed as ignored when on)
    data.update(sdxl=False, sdxl_cache_text_encoder_outputs=False)
    loaded = load_settings_file(_write(tmp_path / "sd.json", data))
    assert loaded.values["sdxl"] is False and "no_half_vae" not in loaded.values
    assert "cache_text_encoder_outputs" not in loaded.values and "sdxl_no_half_vae" in loaded.ignored
    assert "sdxl_cache_text_encoder_outputs" not in loaded.ignored  # off: nothing to mention
    # plain kohya names, as keys or in additional_parameters, are taken as they are
    data.update(cache_text_encoder_outputs=True, additional_parameters="--no_half_vae --cache_text_encoder_outputs_to_disk")
    values = load_settings_file(_write(tmp_path / "plain.json", data)).values
    assert (values["cache_text_encoder_outputs"], values["no_half_vae"], values["cache_text_encoder_outputs_to_disk"]) == \
        (True, True, True)


def test_kohya_ss_old_lowercase_optimizer_switch(tmp_path):
    data = {k: v for k, v in KOHYA_APRIL_2023.items() if k != "optimizer"}
    data["use_8bit_adam"] = True
    store = resolve_settings({"load_json_path": _write(tmp_path / "old.json", data)}).store
    assert store.optimizer_type == "AdamW8bit"


def test_kohya_ss_bad_values_each_name_their_key(tmp_path):
    data = dict(KOHYA_APRIL_2023, network_dim="lots", max_resolution="big", lr_warmup="ten", LoRA_type="LoRA-FA",
                train_batch_size=1.5, optimizer="Sophia", sdxl="maybe")
    with pytest.raises(UserErrors) as info:
        load_settings_file(_write(tmp_path / "bad.json", data))
    lines = [str(e) for e in info.value.errors]
    assert any(line.startswith("bad.json: max_resolution: expected \"W,H\"") for line in lines)
    assert any(line.startswith("bad.json: lr_warmup: expected a percentage") for line in lines)
    assert any(line.startswith("bad.json: LoRA_type: 'LoRA-FA' is not supported") for line in lines)
    assert any(line.startswith("bad.json: sdxl: ") for line in lines)  # SDXL files load; a bad value is named
    assert "bad.json: network_dim (-> net_dim): expected an integer, got 'lots'" in lines
    assert "bad.json: train_batch_size (-> batch_size): expected an integer, got 1.5" in lines
    assert any(line.startswith("bad.json: optimizer (-> optimizer_type): 'Sophia' is not one of") for line in lines)
    assert len(lines) == 7 and all("\n" not in line for line in lines)


# ------------------------------------------------------------------------------------------ our files
def test_wrong_types_name_the_key_and_the_type(tmp_path):
    path = _write(tmp_path / "typo.json", {"net_dim": "abc", "buckets": "maybe", "optimizer_args": 5,
                                           "scheduler": "sometimes", "learning_rate": [1], "alpha": 8})
    with pytest.raises(UserErrors) as info:
        load_settings_file(path)
    assert [str(e) for e in info.value.errors] == [
        "typo.json: net_dim: expected an integer, got 'abc'",
        "typo.json: buckets: expected true/false, got 'maybe'",
        "typo.json: optimizer_args: expected an object of key/value pairs, got 5",
        "typo.json: scheduler: 'sometimes' is not one of linear, cosine, cosine_with_restarts, polynomial, "
        "constant, constant_with_warmup, adafactor",
        "typo.json: learning_rate: expected a number, got [1]",
    ]


@pytest.mark.parametrize("text, where", [
    ('{\n  "net_dim": 32,\n  "alpha": 16\n  "scheduler": "cosine"\n}', "line 4, column 3"),
    ('{"net_dim": 32,}', "line 1, column 16"),
    ("", "line 1, column 1"),
])
def test_malformed_json_gives_line_and_column(tmp_path, text, where):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings_file(str(path))
    assert str(info.value).startswith(f"broken.json: not valid JSON at {where}:")


def test_not_an_object_and_not_utf8(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object of settings, found a list"):
        load_settings_file(str(path))
    path = tmp_path / "latin.json"
    path.write_bytes('{"training_comment": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings_file(str(path))
    path = tmp_path / "bom.json"
    path.write_bytes('{"training_comment": "café"}'.encode("utf-8-sig"))
    assert load_settings_file(str(path)).values["training_comment"] == "café"


def test_empty_string_means_unset_and_comments_are_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "a.json", {"_comment": "notes", "reg_img_folder": "", "caption_extension": "",
                                        "net_dim": 8})
    resolved = resolve_settings({"load_json_path": path})
    assert resolved.warnings == []
    assert resolved.store.reg_img_folder is None and resolved.store.caption_extension == ".txt"


def test_json_load_skip_list_from_every_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {"net_dim": 8, "alpha": 4, "base_model": "/json/model.safetensors", "img_folder": "/json/imgs"}
    path = _write(tmp_path / "a.json", data)
    # from the command line
    store = resolve_settings({"load_json_path": path, "json_load_skip_list": ["net_dim", "base_model"]}).store
    assert (store.net_dim, store.alpha, store.base_model) == (32, 4, None)
    # from ArgsList.py defaults
    store = resolve_settings({"load_json_path": path}, ArgStore(json_load_skip_list=["alpha"])).store
    assert (store.net_dim, store.alpha) == (8, 16)
    # inside the file itself, whatever its position
    path = _write(tmp_path / "b.json", {**data, "json_load_skip_list": ["net_dim", "img_folder"]})
    store = resolve_settings({"load_json_path": path}).store
    assert (store.net_dim, store.img_folder, store.alpha) == (32, None, 4)
    # the command line still wins over a skipped key
    assert resolve_settings({"load_json_path": path, "net_dim": 2}).store.net_dim == 2
    with pytest.raises(ConfigError, match="unknown setting.*img_foldr"):
        resolve_settings({"load_json_path": path, "json_load_skip_list": ["img_foldr"]})


def test_relative_paths_are_found_from_the_current_folder_then_beside_the_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    path = _write(project / "job.json", {"img_folder": "data", "reg_img_folder": "data", "output_folder": "out"})
    monkeypatch.chdir(tmp_path)
    store = resolve_settings({"load_json_path": path}).store
    assert store.img_folder == str(tmp_path / "data")  # current folder first
    assert store.output_folder == str(tmp_path / "out")
    monkeypatch.chdir(project.parent.parent)
    (tmp_path / "data").rmdir()
    store = resolve_settings({"load_json_path": path}).store
    assert store.img_folder == str(project / "data")  # then beside the JSON file
