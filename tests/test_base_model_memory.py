"""With mixed precision on a GPU the frozen base model is loaded straight in the training dtype (half the RAM of a
float32 load: SDXL's float32 copy alone is 13.5 GB) and the VAE in float32 with ``no_half_vae``, while the trained
network stays float32, or takes the training dtype with kohya's ``full_bf16``. A CPU stands in for the GPU here: the
dtype choice is forced to bfloat16 (fp16 needs CUDA's loss scaler: tests/test_gpu.py). ``lowram`` moves each part to
the device as soon as it is built."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("module, args, full_bf16", [("networks.lora", ["conv_dim=2"], False),
                                                     ("lycoris.kohya", ["algo=loha"], False),
                                                     ("networks.lora", [], True)])
def test_bf16_training_loads_the_base_in_bf16_and_trains_float32_weights(module, args, full_bf16, tiny_sd1_single_file,
                                                                           tmp_path, monkeypatch):
    from sd_scripts.models import loading as model_loading
    from sd_scripts.training import loop as train_loop
    from sd_scripts.training import setup as train_setup
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir
    from sd_scripts.networks import factory

    monkeypatch.setattr(train_setup, "_base_dtypes",
                        lambda config, device: (torch.bfloat16, torch.float32 if config.no_half_vae else torch.bfloat16))
    loads, networks = [], []
    real_load, real_build = model_loading.load_model, factory.build_network

    def spy_load(config, dtype=None, vae_dtype=None, device=None):
        model = real_load(config, dtype=dtype, vae_dtype=vae_dtype, device=device)
        loads.append((dtype, vae_dtype, model.unet.dtype, model.vae.dtype, model.text_encoders[0].dtype))
        return model

    def spy_build(*a, **kw):
        built = real_build(*a, **kw)
        networks.append(built.network)
        return built

    monkeypatch.setattr(model_loading, "load_model", spy_load)
    monkeypatch.setattr(factory, "build_network", spy_build)
    data = make_dataset(tmp_path / "data", count=2)
    result = train_loop.train(tiny_config(tiny_sd1_single_file, data, tmp_path / "out", mixed_precision="bf16",
                                          no_half_vae=True, max_train_steps=2, network_module=module, full_bf16=full_bf16,
                                          network_args=args, tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(
                                              tiny_sd1_single_file))))
    assert loads == [(torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)]
    params = list(networks[0].parameters())
    assert params and all(p.dtype == (torch.bfloat16 if full_bf16 else torch.float32) for p in params)
    assert all(math.isfinite(x) for x in result.losses)
    sd = load_file(result.output_path)
    assert sd and all(torch.isfinite(v.float()).all() for v in sd.values())


def test_full_bf16_without_cuda_says_it_has_no_effect(tiny_sd1_diffusers, tmp_path, monkeypatch):
    from sd_scripts.training import speed
    from sd_scripts.training.loop import train

    monkeypatch.setattr(speed, "cpu_bf16_support", lambda cpuinfo=None: "emulated")  # a CPU without bf16 instructions

    data = make_dataset(tmp_path / "data", count=2)
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", mixed_precision="bf16", full_bf16=True,
                               max_train_steps=1))
    assert any(w.startswith("full_bf16: has no effect here") for w in result.warnings), result.warnings


@pytest.mark.parametrize("fixture", ["tiny_sd1_single_file", "tiny_sdxl_diffusers"])
def test_lowram_moves_each_part_as_it_is_built(fixture, request):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.loading import load_model
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

    path = request.getfixturevalue(fixture)
    config = TrainConfig(pretrained_model_name_or_path=str(path))
    if path.is_file():
        config.tokenizer_cache_dir = str(tiny_tokenizer_cache_dir(path))
    model = load_model(config, device=torch.device("meta"))  # "meta" stands in for the GPU
    parts = [model.unet, model.vae, *model.text_encoders]
    assert all(p.device.type == "meta" for part in parts for p in part.parameters())


def test_lowram_without_cuda_says_it_has_no_effect(tiny_sd1_diffusers, tmp_path):
    from sd_scripts.training.loop import train

    data = make_dataset(tmp_path / "data", count=2)
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", lowram=True, max_train_steps=1))
    assert any(w.startswith("lowram: has no effect here") for w in result.warnings), result.warnings


def test_fp8_base_stores_the_frozen_weights_in_float8_on_cuda_only(tiny_sd1_diffusers, tmp_path):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.loop import train
    from sd_scripts.training.setup import _frozen_dtypes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fp8 = torch.float8_e4m3fn
    assert _frozen_dtypes(TrainConfig(fp8_base=True), torch.bfloat16, cuda) == (fp8, fp8)
    assert _frozen_dtypes(TrainConfig(fp8_base_unet=True), torch.bfloat16, cuda) == (fp8, torch.bfloat16)
    assert _frozen_dtypes(TrainConfig(fp8_base=True), torch.float32, cpu) == (torch.float32, torch.float32)
    assert _frozen_dtypes(TrainConfig(), torch.float16, cuda) == (torch.float16, torch.float16)
    data = make_dataset(tmp_path / "data", count=2)
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", mixed_precision="bf16", fp8_base=True,
                               max_train_steps=1))
    assert any(w.startswith("fp8_base: has no effect here") for w in result.warnings), result.warnings
