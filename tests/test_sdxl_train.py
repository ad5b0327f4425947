"""End-to-end SDXL trainings on tiny SDXL models through ``train_loop.train``: kohya's SDXL file layout and metadata,
size/crop conditioning from the buckets, diffusers' SDXL pipeline loads the result, the text-encoder output cache,
and the caching conflicts stopped in preflight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts.core.errors import UserErrors
from sd_scripts.models.families import SDXLFamily
from tests.helpers import make_dataset, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = make_dataset(tmp_path / "data", count=2, size=(64, 64))
    make_dataset(root, folder="3_sks wide", count=2, size=(96, 64))
    return root


def _xl_config(model, data, out, **kw):
    values = dict(resolution="64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    values.update(kw)
    if Path(model).is_file():
        from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

        values.setdefault("tokenizer_cache_dir", str(tiny_tokenizer_cache_dir(model)))
    return tiny_config(model, data, out, **values)


def _train(config):
    from sd_scripts.training.loop import train

    return train(config)


def test_sdxl_lora_trains_with_size_conditioning_and_loads_in_diffusers(tiny_sdxl_diffusers, dataset, tmp_path,
                                                                         monkeypatch):
    seen: list[list[float]] = []
    original = SDXLFamily.time_ids

    def recording(batch, noisy, vae_scale=8):
        ids = original(batch, noisy, vae_scale)
        seen.extend(ids.tolist())
        return ids

    monkeypatch.setattr(SDXLFamily, "time_ids", staticmethod(recording))
    out = tmp_path / "out"
    result = _train(_xl_config(tiny_sdxl_diffusers, dataset, out, save_precision="fp16", max_train_steps=4,
                               flip_aug=True, network_args=["conv_dim=2", "conv_alpha=1"]))
    path = Path(result.output_path)
    assert path == out / "tiny.safetensors" and all(torch.isfinite(torch.tensor(result.losses)))
    # original (h, w), crop (top, left), target (h, w) per sample from the buckets: 64x64 and 96x64 images
    sizes = {tuple(row[:2]) for row in seen}
    assert sizes <= {(64.0, 64.0), (64.0, 96.0)} and len(seen) == 4 * 2
    assert all(row[4] % 32 == 0 and row[5] % 32 == 0 for row in seen)

    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for n in names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_2_2_conv" in names  # LoCon on an upsampler
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert all(sd[n + ".alpha"].dim() == 0 for n in names)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert json.loads(md["ss_dataset_dirs"]) == {"5_sks shape": {"n_repeats": 5, "img_count": 2},
                                                 "3_sks wide": {"n_repeats": 3, "img_count": 2}}

    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_diffusers), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("sks shape, red", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]

    base = image()
    pipe.load_lora_weights(str(path))
    injected = sum(isinstance(m, LoraLayer) for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                   for m in part.modules())
    assert injected == len(names)
    assert abs(image() - base).max() > 1e-4, "the trained LoRA must change the image"


def test_sdxl_single_file_unet_only_with_caches_and_samples(tiny_sdxl_single_file, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape, red --w 64 --h 64 --d 3 --s 2\n", encoding="utf-8")
    out = tmp_path / "out"
    result = _train(_xl_config(tiny_sdxl_single_file, dataset, out, max_train_steps=3, network_train_unet_only=True,
                               cache_latents=True, cache_text_encoder_outputs=True, min_snr_gamma=5.0,
                               sample_prompts=str(prompts), sample_every_n_steps=3))
    sd = load_file(result.output_path)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any(p.endswith(".png") for p in result.sample_files)


def test_text_encoder_output_cache_memory_and_disk(tiny_sdxl_single_file, dataset, tmp_path):
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.data.dataset_layout import scan_dataset
    from sd_scripts.models.loading import load_model
    from sd_scripts.data.te_cache import build_text_encoder_cache, fixed_captions
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

    config = TrainConfig(pretrained_model_name_or_path=str(tiny_sdxl_single_file), train_data_dir=str(dataset),
                         output_dir=str(tmp_path / "out"), resolution="64", min_bucket_reso=32, max_bucket_reso=128,
                         bucket_reso_steps=32,
                         tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(tiny_sdxl_single_file)),
                         cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, max_token_length=150)
    plan = scan_dataset(config)
    model = load_model(config)
    captions = fixed_captions(plan)
    assert sorted(captions) == sorted({"sks shape, red, circle", "sks shape, green, circle"})
    cache = build_text_encoder_cache(config, plan, model, settings_key="m")
    assert cache.encoded == len(captions) and cache.loaded_from_disk == 0
    files = sorted((tmp_path / "out" / ".te_cache").glob("*.npz"))
    assert len(files) == len(captions)
    with torch.no_grad():
        direct = model.family.encode_prompts(model, [captions[1]], None, 150)
    batch = cache.get([captions[1], captions[0], captions[1]])
    assert batch["encoder_hidden_states"].shape == (3, 152, 192) and batch["text_embeds"].shape == (3, 96)
    assert torch.equal(batch["encoder_hidden_states"][0], direct["encoder_hidden_states"][0])
    again = build_text_encoder_cache(config, plan, model, settings_key="m")
    assert again.loaded_from_disk == len(captions) and again.encoded == 0
    for c in captions:
        for name, value in cache.rows[c].items():
            assert torch.equal(again.rows[c][name], value)
    other = build_text_encoder_cache(config.replace(max_token_length=None), plan, model, settings_key="m")
    assert other.encoded == len(captions)  # other settings, other keys
    files[0].write_bytes(b"broken")
    fixed = build_text_encoder_cache(config, plan, model, settings_key="m")
    assert fixed.encoded == 1 and fixed.loaded_from_disk == len(captions) - 1


def test_caching_conflicts_stop_in_preflight(tiny_sdxl_diffusers, dataset, tmp_path):
    with pytest.raises(UserErrors) as e:
        _train(_xl_config(tiny_sdxl_diffusers, dataset, tmp_path / "out", cache_text_encoder_outputs=True,
                          shuffle_caption=True))
    texts = [str(err) for err in e.value.errors]
    assert any("cache_text_encoder_outputs" in t and "network_train_unet_only" in t for t in texts)
    assert any("cache_text_encoder_outputs" in t and "shuffle_caption" in t for t in texts)
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


def test_text_encoder_cache_gives_the_same_lora_and_frees_the_encoders(tiny_sdxl_diffusers, tmp_path):
    """cache_text_encoder_outputs: same LoRA as encoding on the fly; the text encoders leave the device."""
    import torch
    from safetensors.torch import load_file

    from sd_scripts.training.loop import train
    from tests.helpers import make_dataset, tiny_config

    data = make_dataset(tmp_path / "data", count=2)
    common = dict(network_train_unet_only=True, max_train_steps=2, bucket_reso_steps=32, no_half_vae=True)
    plain = train(tiny_config(tiny_sdxl_diffusers, data, tmp_path / "a", **common))
    cached = train(tiny_config(tiny_sdxl_diffusers, data, tmp_path / "b", cache_text_encoder_outputs=True, **common))
    sa, sb = load_file(plain.output_path), load_file(cached.output_path)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
