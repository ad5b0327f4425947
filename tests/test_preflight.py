"""Preflight: every problem reported together, the dataset summary, the LoRA size estimate and the
free-disk-space check (shutil.disk_usage monkeypatched), nothing written."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from sd_scripts.core.errors import UserErrors
from sd_scripts.training.preflight import check_disk_space, estimate_lora_bytes, preflight
from tests.helpers import make_dataset, tiny_config, tree_digest

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from sd_scripts.testing.tiny_models import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("pf_model") / "model.safetensors", "sd1")


def _config(model: Path, data: Path, out: Path, **overrides):
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

    overrides.setdefault("tokenizer_cache_dir", str(tiny_tokenizer_cache_dir(model)))
    return tiny_config(model, data, out, **overrides)


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def test_a_good_run_passes_and_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=4)
    before = tree_digest(tmp_path)
    plan = preflight(_config(model, data, tmp_path / "out", cache_latents=True, cache_latents_to_disk=True))
    assert plan.family.name == "sd1" and plan.dataset.num_train_images == 20
    assert plan.summary == ["dataset: 4 training image(s) in 1 folder(s), 20 with repeats"]
    need = plan.disk[0]
    assert need.setting == "output_dir" and any("latent cache" in p for p in need.parts)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_every_problem_is_reported_together(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=2)
    (data / "5_sks shape" / "img00.txt").write_bytes(b"caf\xe9")
    config = _config(model, data, tmp_path / "out", clip_skip=13, network_dim=0, optimizer_type="NoSuchOpt",
                     sample_sampler="magic", sample_prompts=str(tmp_path / "p.txt"), vae=str(tmp_path / "vae.pt"),
                     output_name="a/b", max_token_length=100)
    (tmp_path / "p.txt").write_text("a cat --q 3\n", encoding="utf-8")
    with pytest.raises(UserErrors) as e:
        preflight(config)
    lines = [str(x) for x in e.value.errors]
    for start in ("clip_skip:", "network_dim:", "optimizer_type", "sample_sampler:", "vae:", "output_name:",
                  "max_token_length:", "sample_prompts line 1: unknown option --q", "train_data_dir: caption file"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert all("\n" not in line for line in lines)
    assert len(lines) == len(set(lines))


def test_model_warnings_reach_the_plan(tmp_path, monkeypatch):
    from sd_scripts.testing.tiny_models import save_tiny_single_file, tiny_tokenizer_cache_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd2 = save_tiny_single_file(tmp_path / "m" / "sd2.safetensors", "sd2")
    sd2.with_suffix(".yaml").unlink()  # the prediction type cannot be told any more
    data = make_dataset(tmp_path / "data", count=1)
    plan = preflight(_config(sd2, data, tmp_path / "out", tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(sd2))))
    assert any("v_parameterization" in w for w in plan.warnings), plan.warnings


def test_tokenizer_missing_offline_is_found_before_loading(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    data = make_dataset(tmp_path / "data", count=1)
    with pytest.raises(UserErrors) as e:
        preflight(_config(model, data, tmp_path / "out", tokenizer_cache_dir=str(tmp_path / "nothing_here")))
    assert str(e.value).startswith("tokenizer_cache_dir: no sd1 CLIP tokenizer found offline")


@pytest.mark.parametrize("overrides, start", [
    (dict(output_name="con"), "output_name: 'con' is a reserved"),
    (dict(output_name="lora. "), "output_name: 'lora. ' ends with"),
    (dict(output_name=""), "output_name: is empty"),
    (dict(network_alpha=-1.0), "network_alpha:"),
    (dict(network_dropout=2.0), "network_dropout:"),
    (dict(caption_dropout_rate=-0.5), "caption_dropout_rate:"),
    (dict(lr_warmup_steps=-3), "lr_warmup_steps:"),
    (dict(multires_noise_discount=3.0), "multires_noise_discount:"),
    (dict(full_fp16=True, full_bf16=True, mixed_precision="bf16"), "full_fp16:"),
    (dict(dim_from_weights=True), "dim_from_weights: needs network_weights"),
    (dict(log_with="comet"), "log_with: 'comet'"),
    (dict(sample_every_n_steps=0), "sample_every_n_steps:"),
    (dict(max_data_loader_n_workers=-1), "max_data_loader_n_workers:"),
])
def test_setting_checks(model, tmp_path, monkeypatch, overrides, start):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=1)
    with pytest.raises(UserErrors) as e:
        preflight(_config(model, data, tmp_path / "out", **overrides))
    assert any(str(x).startswith(start) for x in e.value.errors), str(e.value)


def test_output_inside_the_dataset_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=1)
    for out in (data, data / "loras", data / "5_sks shape"):
        with pytest.raises(UserErrors) as e:
            preflight(_config(model, data, out))
        assert str(e.value).startswith("output_dir:") and "inside the dataset" in str(e.value)
    preflight(_config(model, data, tmp_path / "data_loras"))  # a sibling whose name starts the same is fine


# --------------------------------------------------------------------------------------------- disk


def test_disk_full_is_an_error_naming_output_dir(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=2)
    config = _config(model, data, tmp_path / "out")
    lora = estimate_lora_bytes(config, None, {"kind": "single_file", "format": "safetensors", "path": str(model)})
    _free(monkeypatch, lora // 2)
    with pytest.raises(UserErrors) as e:
        preflight(config)
    text = str(e.value)
    assert text.startswith("output_dir: not enough free disk space in ") and "choose an output_dir" in text
    assert not (tmp_path / "out").exists()
    _free(monkeypatch, int(lora * 1.5))  # enough, but short: a warning
    plan = preflight(config)
    assert any(w.startswith("output_dir: disk space is short") for w in plan.warnings)
    _free(monkeypatch, lora * 100)
    assert not any("disk space" in w for w in preflight(config).warnings)


def test_disk_need_counts_saves_states_and_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=4)  # 20 images with repeats, batch 2: 10 steps per epoch
    _free(monkeypatch, 10**15)
    base = preflight(_config(model, data, tmp_path / "out", max_train_steps=None, max_train_epochs=10))
    one = base.disk[0].bytes
    every = preflight(_config(model, data, tmp_path / "out", max_train_steps=None, max_train_epochs=10,
                              save_every_n_epochs=2))
    assert every.disk[0].bytes == 6 * one  # epochs 2, 4, 6, 8, 10 and the final file
    capped = preflight(_config(model, data, tmp_path / "out", max_train_steps=None, max_train_epochs=10,
                               save_every_n_epochs=2, save_last_n_epochs=2))
    assert capped.disk[0].bytes == 3 * one
    states = preflight(_config(model, data, tmp_path / "out", max_train_steps=None, max_train_epochs=10,
                               save_state=True))
    assert states.disk[0].bytes > 3 * one and any("training state" in p for p in states.disk[0].parts)
    cached = preflight(_config(model, data, tmp_path / "out", cache_latents=True, cache_latents_to_disk=True,
                               flip_aug=True, resolution="128", max_bucket_reso=128))
    # 4 images x (latents + flipped latents) of 4 x 16 x 16 float32
    assert cached.disk[0].bytes - one >= 4 * 2 * 4 * 16 * 16 * 4


def test_disk_need_counts_samples_logs_and_text_encoder_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shape --w 64 --h 64\na blue shape --w 128 --h 64\n", encoding="utf-8")
    _free(monkeypatch, 10**15)
    common = dict(max_train_steps=10)
    one = preflight(_config(model, data, tmp_path / "out", **common)).disk[0].bytes
    sampled = preflight(_config(model, data, tmp_path / "out", sample_prompts=str(prompts), sample_every_n_steps=2,
                                sample_at_first=True, logging_dir=str(tmp_path / "logs"), **common)).disk[0]
    # 5 + 1 sampling points x (64x64 + 128x64 px, and the grid again) x 2 bytes per pixel; 10 steps of logs
    assert sampled.bytes - one == 6 * 2 * (64 * 64 + 128 * 64) * 2 + 10 * 512
    assert any(p.startswith("sample images of about") for p in sampled.parts)
    assert any(p.startswith("training logs of about") for p in sampled.parts)
    unet_only = preflight(_config(model, data, tmp_path / "out", network_train_unet_only=True, **common)).disk[0]
    cached = preflight(_config(model, data, tmp_path / "out", cache_text_encoder_outputs_to_disk=True,
                               network_train_unet_only=True, **common)).disk[0]
    assert cached.bytes - unet_only.bytes >= 4 * 77 * 768 * 4 and any("text-encoder cache" in p for p in cached.parts)
    _free(monkeypatch, one + 1000)  # the LoRA fits, the samples do not: the line says what takes the space
    with pytest.raises(UserErrors) as e:
        preflight(_config(model, data, tmp_path / "out", sample_prompts=str(prompts), sample_every_n_steps=2,
                          **common))
    assert str(e.value).startswith("output_dir: not enough free disk space") and "sample images" in str(e.value)


def test_existing_latent_cache_is_not_counted_again(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=4)
    config = _config(model, data, tmp_path / "out", cache_latents=True, cache_latents_to_disk=True,
                     resolution="128", max_bucket_reso=128)
    _free(monkeypatch, 10**15)
    fresh = preflight(config).disk[0].bytes
    cache = tmp_path / "out" / ".latent_cache"
    cache.mkdir(parents=True)
    (cache / "old.npz").write_bytes(b"\0" * 50_000)
    assert preflight(config).disk[0].bytes < fresh


def test_check_disk_space_without_output_dir_does_nothing(tmp_path):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.preflight import Plan

    assert check_disk_space(TrainConfig(), Plan()) == ([], [], [])


# ------------------------------------------------------------------------------------------ LoRA size


def test_lora_size_estimate_matches_a_saved_file(model, tmp_path, monkeypatch):
    """The estimate from the checkpoint header is the size of the file training would save."""
    import torch

    from sd_scripts.files.lora_file import save_lora_file
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.factory import build_network

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_dataset(tmp_path / "data", count=1)
    info = {"kind": "single_file", "format": "safetensors", "path": str(model)}
    for overrides in (dict(network_dim=4, save_precision="fp16"), dict(network_dim=8, save_precision="float"),
                      dict(network_dim=4, network_args=["conv_dim=2"], save_precision="fp16"),
                      dict(network_dim=4, network_train_unet_only=True, save_precision="fp16")):
        config = _config(model, data, tmp_path / "out", **overrides)
        loaded = load_model(config)  # a fresh model: build_network wraps its layers
        built = build_network(config, loaded, train_unet=True, train_text_encoder=not config.network_train_unet_only)
        path = tmp_path / "lora.safetensors"
        save_lora_file(path, built.network.kohya_state_dict(), {"ss_network_dim": str(config.network_dim)},
                       save_dtype=torch.float16 if config.save_precision == "fp16" else torch.float32)
        actual = path.stat().st_size
        estimate = estimate_lora_bytes(config, loaded.family, info)
        assert 0.9 * actual <= estimate <= 1.1 * actual + 70_000, (overrides, actual, estimate)


def test_lora_size_estimate_of_full_size_sd15():
    """kohya's dim-128 SD1.5 LoRA in fp16 is 151 MB; dim 32 is 38 MB."""
    from sd_scripts.models.ldm_convert import models_to_ldm
    from sd_scripts.training.preflight.disk_space import _lora_params_from_shapes
    from tests.test_model_loading import _meta_sd15

    unet, vae, te = _meta_sd15()
    shapes = {k: tuple(v.shape) for k, v in models_to_ldm(unet, vae, te, "clip").items()}
    assert _lora_params_from_shapes(shapes, 128, None, True, True, ldm=True) * 2 == 150_994_944
    assert _lora_params_from_shapes(shapes, 32, None, True, True, ldm=True) * 2 == 37_748_736
    unet_only = _lora_params_from_shapes(shapes, 32, None, True, False, ldm=True)
    assert 0.7 < unet_only / _lora_params_from_shapes(shapes, 32, None, True, True, ldm=True) < 0.8
    with_conv = _lora_params_from_shapes(shapes, 32, 16, True, True, ldm=True)
    assert with_conv > 1.4 * _lora_params_from_shapes(shapes, 32, None, True, True, ldm=True)
