"""FLUX.1 LoRA training end to end on the tiny model: the engine, kohya's command line and main.py."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

from helpers import flux_settings, make_dataset, tiny_config, tree_digest  # noqa: E402


def _config(files, tmp_path, **overrides):
    data = make_dataset(tmp_path / "data", size=(64, 64))
    values = flux_settings(files) | {"resolution": "64", "bucket_reso_steps": 64, "max_train_steps": 3,
                                     "network_dim": 4, "network_alpha": 2.0, "clip_skip": None}
    values.update(overrides)
    return tiny_config(files["transformer"], data, tmp_path / "out", **values)


def test_train_saves_a_kohya_flux_lora_with_flux_metadata(tiny_flux_files, tmp_path):
    from safetensors import safe_open

    from sd_scripts.training.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape, red --w 64 --h 64 --d 1 --g 3.5 --s 3\nblue circle --w 72 --h 88 --d 2 --s 2\n",
                       encoding="utf-8")
    config = _config(tiny_flux_files, tmp_path, sample_prompts=str(prompts), sample_every_n_steps=3,
                     model_prediction_type="raw", timestep_sampling="shift", discrete_flow_shift=3.1582,
                     guidance_scale=1.0, apply_t5_attn_mask=True, network_args=["train_blocks=all"],
                     validation_split=0.25, validate_every_n_steps=3)
    before = tree_digest(tmp_path / "data")
    result = train(config)
    assert tree_digest(tmp_path / "data") == before
    assert result.global_step == 3 and all(map(lambda x: x == x, result.losses))
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert not any(k.startswith("lora_te3_") for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in meta and "modelspec.encoder_layer" not in meta
    assert meta["ss_apply_t5_attn_mask"] == "True" and meta["ss_guidance_scale"] == "1.0"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_model_prediction_type"] == "raw"
    assert meta["ss_discrete_flow_shift"] == "3.1582" and meta["ss_weighting_scheme"] == "uniform"
    assert json.loads(meta["ss_network_args"]) == {"train_blocks": "all"}
    images = [p for p in result.sample_files if "_grid_" not in p]
    assert len(images) == 2 and any("_grid_" in p for p in result.sample_files)
    from PIL import Image

    assert Image.open(images[1]).size == (64, 80)  # sides floored to multiples of 16
    assert result.validation_losses and result.validation_losses[0][1] == result.validation_losses[0][1]


def test_schnell_unet_only_with_cached_text_encoder_outputs_and_lokr(tiny_flux_schnell_files, tmp_path):
    pytest.importorskip("lycoris")
    from safetensors import safe_open

    from sd_scripts.training.loop import train

    config = _config(tiny_flux_schnell_files, tmp_path, network_train_unet_only=True,
                     cache_text_encoder_outputs_to_disk=True, cache_latents=True, network_module="lycoris.kohya",
                     network_args=["algo=lokr", "factor=4"], weighting_scheme="logit_normal",
                     timestep_sampling="sigma")
    result = train(config)
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.lokr_w1") for k in keys)
    assert not any(k.startswith("lora_te") for k in keys)
    assert os.listdir(tmp_path / "out" / ".te_cache")


def test_kohya_flux_command_line(tiny_flux_files, tmp_path, capsys):
    from sd_scripts import flux_train_network

    data = make_dataset(tmp_path / "data")
    settings = flux_settings(tiny_flux_files)
    argv = [f"--{k}={v}" for k, v in settings.items()] + [
        "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--output_name", "kohya_flux",
        "--resolution", "64", "--min_bucket_reso", "64", "--max_train_steps", "2", "--network_module", "networks.lora_flux",
        "--network_dim", "4", "--optimizer_type", "AdamW", "--network_train_unet_only",
        "--timestep_sampling", "flux_shift", "--model_prediction_type", "sigma_scaled", "--weighting_scheme",
        "cosmap"]
    assert flux_train_network.main(argv) == 0
    assert (tmp_path / "out" / "kohya_flux.safetensors").is_file()
    code = flux_train_network.main(["--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"),
                                    "--model_family", "sdxl"])
    assert code == 2
    assert "flux_train_network.py" in capsys.readouterr().err


def test_main_trains_flux_from_a_json_file_with_the_parts_as_settings(tiny_flux_files, tmp_path, capsys):
    import main

    data = make_dataset(tmp_path / "data", count=2, size=(64, 64))
    out = tmp_path / "out"
    job = tmp_path / "flux.json"
    job.write_text(json.dumps({
        "base_model": str(tiny_flux_files["transformer"]), "clip_l": str(tiny_flux_files["clip_l"]),
        "t5xxl": str(tiny_flux_files["t5xxl"]), "ae": str(tiny_flux_files["ae"]),
        "tokenizer_cache_dir": str(tiny_flux_files["tokenizer_cache_dir"]), "img_folder": str(data),
        "output_folder": str(out), "change_output_name": "flux", "train_resolution": 64, "min_bucket_resolution": 64,
        "max_bucket_resolution": 128, "max_steps": 2, "batch_size": 2, "net_dim": 2, "alpha": 1,
        "optimizer_type": "AdamW", "mixed_precision": "no", "xformers": False, "num_workers": 0,
        "unet_only": True, "cache_text_encoder_outputs": True, "timestep_sampling": "sigmoid",
        "model_prediction_type": "additive", "guidance_scale": 2.0}), encoding="utf-8")
    code = main.main(["--load_json_path", str(job)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    from safetensors import safe_open

    with safe_open(str(out / "flux.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_timestep_sampling"] == "sigmoid" and meta["ss_guidance_scale"] == "2.0"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    saved = json.loads((out / "flux_settings.json").read_text(encoding="utf-8"))
    assert saved["t5xxl"] == str(tiny_flux_files["t5xxl"]) and saved["clip_skip"] == 1  # FLUX's neutral value


def test_resume_is_bit_identical_and_alpha_masks_train(tiny_flux_files, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from sd_scripts.training.loop import train

    data = make_dataset(tmp_path / "data", folder="1_sks shape", count=4)
    for i, png in enumerate(sorted((data / "1_sks shape").glob("*.png"))):
        rgba = Image.open(png).convert("RGBA")
        rgba.putalpha(Image.new("L", rgba.size, 255 if i % 2 else 96))
        rgba.save(png)
    settings = flux_settings(tiny_flux_files) | {"resolution": "64", "max_train_steps": 4, "network_dim": 4,
                                                 "clip_skip": None, "alpha_mask": True, "noise_offset": 0.05,
                                                 "loss_type": "huber", "huber_schedule": "exponential",
                                                 "ip_noise_gamma": 0.1, "timestep_sampling": "sigmoid"}
    whole = train(tiny_config(tiny_flux_files["transformer"], data, tmp_path / "whole", save_state=True,
                              save_every_n_steps=2, **settings))
    resumed = train(tiny_config(tiny_flux_files["transformer"], data, tmp_path / "resumed",
                                resume=str(tmp_path / "whole" / "tiny-step00000002-state"), **settings))
    a, b = load_file(whole.output_path), load_file(resumed.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.global_step == 4 and len(resumed.losses) == 4
