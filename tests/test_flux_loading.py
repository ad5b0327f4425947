"""Loading FLUX.1 in the forms users download: BFL single file (+ clip_l/t5xxl/ae), with the ComfyUI prefix, fp8,
all-in-one, a diffusers FluxPipeline folder; dev/schnell detection; tokenizers offline."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.core.config import TrainConfig  # noqa: E402
from sd_scripts.core.errors import ModelLoadError  # noqa: E402
from sd_scripts.models.loading import detect_family, load_model  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    config = TrainConfig()
    for key, value in kw.items():
        setattr(config, key, value)
    return config


@pytest.fixture()
def flux_files(tiny_flux_files):
    return tiny_flux_files


def _parts(files, **kw):
    settings = {"pretrained_model_name_or_path": str(files["transformer"]), "clip_l": str(files["clip_l"]),
                "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"]),
                "tokenizer_cache_dir": str(files["tokenizer_cache_dir"])}
    return _cfg(**(settings | kw))


def _outputs(model):
    family = model.family
    with torch.no_grad():
        cond = family.encode_prompts(model, ["a photo of sks dog", "red hat"])
        x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
        pred = family.predict(model, x, torch.tensor([500.0, 900.0]), cond)
        decoded = model.vae.decode(family.unscale_latents(x[:1])).sample
    return pred, decoded, cond


def test_separate_files_detect_dev_and_load(flux_files):
    family, info = detect_family(_parts(flux_files))
    assert family.name == "flux" and info["flux_variant"] == "dev" and info["guidance_embed"] is True
    assert not info["has_clip_l"] and not info["has_t5xxl"] and not info["has_ae"]
    model = load_model(_parts(flux_files))
    assert type(model.unet).__name__ == "FluxTransformer" and model.unet.is_dev
    assert [type(t).__name__ for t in model.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert model.vae.config.latent_channels == 16 and model.vae.config.shift_factor == 0.1159
    assert not any(p.requires_grad for p in model.unet.parameters())
    pred, decoded, cond = _outputs(model)
    assert pred.shape == (2, 16, 8, 6) and decoded.shape == (1, 3, 64, 48)
    assert cond["txt"].shape == (2, 512, 32) and cond["y"].shape == (2, 64) and cond["txt_mask"].shape == (2, 512)
    assert cond["txt_mask"][0].sum() < 10  # padding is masked


def test_prefixed_fp8_file_is_upcast_into_the_training_dtype(flux_files, tmp_path):
    from safetensors.torch import load_file

    from sd_scripts.testing.tiny_flux import save_tiny_flux_files

    fp8 = save_tiny_flux_files(tmp_path, transformer_dtype=torch.float8_e4m3fn, prefixed=True)
    raw = load_file(str(fp8["transformer"]))
    assert raw["model.diffusion_model.img_in.weight"].dtype == torch.float8_e4m3fn
    model = load_model(_parts(fp8), dtype=torch.bfloat16)
    weight = model.unet.state_dict()["double_blocks.0.img_attn.qkv.weight"]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, raw["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"].to(torch.bfloat16))
    assert model.text_encoders[1].dtype == torch.bfloat16


def test_all_in_one_and_diffusers_folder_give_the_same_model(flux_files, tmp_path):
    from sd_scripts.testing.tiny_flux import save_tiny_flux_all_in_one, save_tiny_flux_diffusers

    reference = _outputs(load_model(_parts(flux_files)))
    aio = save_tiny_flux_all_in_one(tmp_path / "aio" / "flux1-aio.safetensors")
    family, info = detect_family(_cfg(pretrained_model_name_or_path=str(aio)))
    assert info["has_clip_l"] and info["has_t5xxl"] and info["has_ae"]
    folder = save_tiny_flux_diffusers(tmp_path / "diffusers")
    for config in (_cfg(pretrained_model_name_or_path=str(aio), tokenizer_cache_dir=str(aio.parent / "tokenizer_cache")),
                   _cfg(pretrained_model_name_or_path=str(folder),
                        tokenizer_cache_dir=str(flux_files["tokenizer_cache_dir"]))):
        got = _outputs(load_model(config))
        for a, b in zip(got[:2], reference[:2]):
            assert torch.equal(a, b)
        assert torch.equal(got[2]["txt"], reference[2]["txt"]) and torch.equal(got[2]["y"], reference[2]["y"])


def test_schnell_detection_override_and_missing_parts(tiny_flux_schnell_files, flux_files):
    schnell = tiny_flux_schnell_files
    assert detect_family(_parts(schnell))[1]["flux_variant"] == "schnell"
    assert detect_family(_parts(schnell, flux_variant="dev"))[1]["variant_source"] == "setting"
    model = load_model(_parts(schnell))
    assert not model.unet.is_dev and "guidance_in.in_layer.weight" not in model.unet.state_dict()
    assert model.family.encode_prompts(model, ["a dog"])["txt"].shape[1] == 256  # schnell's T5 length
    no_t5 = _parts(flux_files)
    no_t5.t5xxl = None
    with pytest.raises(ModelLoadError) as e:
        load_model(no_t5)
    assert "t5xxl" in str(e.value) and "\n" not in str(e.value)


def test_t5_tokenizer_offline_error_names_the_setting(flux_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    clip_only = tmp_path / "tok"
    import shutil

    shutil.copytree(flux_files["tokenizer_cache_dir"] / "openai_clip-vit-large-patch14",
                    clip_only / "openai_clip-vit-large-patch14")
    config = _parts(flux_files, tokenizer_cache_dir=str(clip_only))
    with pytest.raises(ModelLoadError) as e:
        load_model(config)
    message = str(e.value)
    assert message.startswith("tokenizer_cache_dir:") and "google_t5-v1_1-xxl" in message and "\n" not in message
