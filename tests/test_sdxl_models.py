"""SDXL as a model family: facts, detection, loading (diffusers folder, single file + SGM yaml, built-in config),
text encoding (checked against diffusers' own SDXL pipeline), size/crop conditioning, sample images, family settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, ModelLoadError
from sd_scripts.models.families import check_family_settings, get_family
from sd_scripts.models.loading import detect_family, load_model
from sd_scripts.testing.tiny_models import TOKENIZER_CACHE_NAMES, build_tiny_components, tiny_tokenizer_cache_dir

SETTING = "pretrained_model_name_or_path"


def _cfg(path, **kw) -> TrainConfig:
    if "tokenizer_cache_dir" not in kw and Path(path).is_file():
        kw["tokenizer_cache_dir"] = str(tiny_tokenizer_cache_dir(path))
    return TrainConfig(pretrained_model_name_or_path=str(path), **kw)


def _one_line(err: Exception, *names: str) -> str:
    text = str(err)
    assert "\n" not in text
    for name in names:
        assert name in text, (name, text)
    return text


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def sdxl_model(tiny_sdxl_single_file):
    return load_model(_cfg(tiny_sdxl_single_file))


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_diffusers):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_diffusers), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ facts


def test_sdxl_family_facts():
    xl = get_family("SDXL")
    assert xl.name == "sdxl" and xl.latent_scale == 0.13025
    assert xl.te_lora_prefixes == ["lora_te1", "lora_te2"]
    assert xl.base_model_version(False) == xl.base_model_version(True) == "sdxl_base_v1-0" and xl.ss_v2 is False
    assert xl.modelspec_architecture(False) == "stable-diffusion-xl-v1-base/lora"
    assert xl.default_resolution == 1024 and xl.bucket_step % 32 == 0
    assert xl.default_settings() == {"resolution": "1024", "min_bucket_reso": 512, "max_bucket_reso": 2048,
                                     "bucket_reso_steps": 64}
    assert get_family("sd1").default_settings()["resolution"] == "512"
    specs = xl.text_encoder_specs
    assert [(s.kind, s.with_projection, s.drop_last_layer) for s in specs] == [("clip", False, False),
                                                                             ("openclip", True, False)]
    assert [s.cache_name for s in xl.tokenizer_sources] == [TOKENIZER_CACHE_NAMES["sdxl"], TOKENIZER_CACHE_NAMES["sdxl_2"]]
    assert get_family("sd1").lora_unet_path_map(None) is None


def test_builtin_full_size_config_round_trips_on_meta_device():
    """The built-in SGM config describes SDXL base; the LDM keys we write are the ones diffusers' converter reads."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sd_scripts.models.ldm_convert import sgm_v_prediction, unet_config_from_sgm, unet_ldm_key_map

    xl = get_family("sdxl")
    ldm = xl.builtin_ldm_config(False)
    params = ldm["model"]["params"]["network_config"]["params"]
    assert params["transformer_depth"] == [0, 2, 10] and params["adm_in_channels"] == 2816
    assert params["num_head_channels"] == 64 and params["context_dim"] == 2048
    assert sgm_v_prediction(ldm) is False and sgm_v_prediction(xl.builtin_ldm_config(True)) is True
    config = unet_config_from_sgm(ldm)
    expected = xl.diffusers_unet_config()
    assert {k: config[k] for k in expected} == expected
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    names = unet.state_dict()
    key_map = unet_ldm_key_map(unet)
    assert key_map["add_embedding.linear_1.weight"] == "model.diffusion_model.label_emb.0.0.weight"
    assert key_map["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"] == \
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    assert key_map["up_blocks.1.upsamplers.0.conv.weight"] == "model.diffusion_model.output_blocks.5.2.conv.weight"
    ldm_state = {v: names[k] for k, v in key_map.items()}
    back = convert_ldm_unet_checkpoint(ldm_state, config)
    assert set(back) == set(names)


# ------------------------------------------------------------------------------------------------ loading


def test_diffusers_folder_detects_and_loads_exact(tiny_sdxl_diffusers):
    family, info = detect_family(_cfg(tiny_sdxl_diffusers))
    assert family.name == "sdxl" and info["kind"] == "diffusers" and info["v_parameterization"] is False
    model = load_model(_cfg(tiny_sdxl_diffusers))
    ref = build_tiny_components("sdxl")
    assert [type(t).__name__ for t in model.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    for a, b in ((model.unet, ref["unet"]), (model.vae, ref["vae"]), (model.text_encoders[0], ref["text_encoder"]),
                 (model.text_encoders[1], ref["text_encoder_2"])):
        _same_weights(a, b)
    assert model.tokenizers[1].pad_token == "!" and model.tokenizers[1].pad_token_id == 0
    assert model.tokenizers[0].pad_token_id == model.tokenizers[0].eos_token_id
    assert model.text_encoder_2 is model.text_encoders[1]
    assert not any(p.requires_grad for te in model.text_encoders for p in te.parameters())


def test_single_file_with_sgm_yaml_loads_exact(tiny_sdxl_single_file, sdxl_model):
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl_single_file), "pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in keys  # all 3 blocks kept
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    ref = build_tiny_components("sdxl")
    assert torch.equal(projection, ref["text_encoder_2"].text_projection.weight.T)  # OpenCLIP keeps it transposed
    family, info = detect_family(_cfg(tiny_sdxl_single_file))
    assert family.name == "sdxl" and info["yaml"].endswith("model.yaml") and info["v_parameterization"] is False
    for a, b in ((sdxl_model.unet, ref["unet"]), (sdxl_model.vae, ref["vae"]),
                 (sdxl_model.text_encoders[0], ref["text_encoder"]), (sdxl_model.text_encoders[1], ref["text_encoder_2"])):
        _same_weights(a, b)
    assert sdxl_model.unet.config.addition_time_embed_dim == 8
    assert list(sdxl_model.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert sdxl_model.vae.config.scaling_factor == 0.13025


def test_detection_reads_the_header_and_settings_force_or_conflict(tmp_path, tiny_sdxl_single_file, tiny_sd1_diffusers,
                                                                   monkeypatch):
    import sd_scripts.models.loading as ml

    monkeypatch.setattr(ml, "read_checkpoint", lambda *a, **k: pytest.fail("detection must not read tensors"))
    assert detect_family(_cfg(tiny_sdxl_single_file))[0].name == "sdxl"
    assert detect_family(_cfg(tiny_sdxl_single_file, sdxl=True))[0].name == "sdxl"
    assert detect_family(_cfg(tiny_sdxl_single_file, model_family="sdxl", sdxl=False))[0].name == "sdxl"
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sdxl_single_file, model_family="sd1"))
    _one_line(e.value, "model_family", "sdxl")
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sdxl_single_file, v2=True))
    _one_line(e.value, "v2")
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sd1_diffusers, sdxl=True))
    _one_line(e.value, "sdxl", "sd1")
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sd1_diffusers, sdxl=True, model_family="sd2"))
    _one_line(e.value, "sdxl")
    # v-prediction from an SGM yaml (VScaling) and from modelspec metadata without a yaml
    stem = tmp_path / "vpred"
    shutil.copy(tiny_sdxl_single_file, stem.with_suffix(".safetensors"))
    import yaml

    config = yaml.safe_load(Path(tiny_sdxl_single_file).with_suffix(".yaml").read_text())
    scaling = config["model"]["params"]["denoiser_config"]["params"]["scaling_config"]
    scaling["target"] = scaling["target"].replace("EpsScaling", "VScaling")
    stem.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    kw = {"tokenizer_cache_dir": str(tiny_tokenizer_cache_dir(tiny_sdxl_single_file))}
    assert detect_family(_cfg(stem.with_suffix(".safetensors"), **kw))[1]["v_parameterization"] is True


def test_refiner_like_checkpoints_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}, str(refiner))
    with pytest.raises(ModelLoadError) as e:
        detect_family(_cfg(refiner))
    _one_line(e.value, SETTING, "refiner", "sdxl")


def test_tokenizer_two_is_padded_with_bang(tmp_path, tiny_sdxl_single_file):
    """kohya forces pad id 0 on SDXL's second tokenizer even when the cached one pads with EOS."""
    from sd_scripts.models.loading import load_tokenizer
    from sd_scripts.testing.tiny_models import write_tiny_tokenizer

    cache = tmp_path / "cache"
    write_tiny_tokenizer(cache / TOKENIZER_CACHE_NAMES["sdxl_2"], pad_token="<|endoftext|>")
    write_tiny_tokenizer(cache / TOKENIZER_CACHE_NAMES["sdxl"], pad_token="<|endoftext|>")
    config = _cfg(tiny_sdxl_single_file, tokenizer_cache_dir=str(cache))
    tok2 = load_tokenizer(get_family("sdxl"), config, None, 1)
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    tok1 = load_tokenizer(get_family("sdxl"), config, None, 0)
    assert tok1.pad_token_id == tok1.eos_token_id


# ------------------------------------------------------------------------------------------ conditioning


def test_encoding_matches_diffusers_sdxl_pipeline(sdxl_pipe, tiny_sdxl_diffusers):
    model = load_model(_cfg(tiny_sdxl_diffusers))
    prompts = ["a photo of sks dog", "red cat with a long hat"]
    with torch.no_grad():
        cond = model.family.encode_prompts(model, prompts)
        embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (2, 77, 192) and cond["text_embeds"].shape == (2, 96)
    assert torch.allclose(cond["encoder_hidden_states"], embeds, atol=1e-5)
    assert torch.allclose(cond["text_embeds"], pooled, atol=1e-5)


def test_long_captions_and_weights(sdxl_model):
    family = sdxl_model.family
    long = ", ".join(["a photo of sks dog"] * 30)
    with torch.no_grad():
        short = family.encode_prompts(sdxl_model, [long])
        cond = family.encode_prompts(sdxl_model, [long, "cat"], max_token_length=225)
        weighted = family.encode_prompts(sdxl_model, ["(cat:1.5) dog"], weighted=True)
        plain = family.encode_prompts(sdxl_model, ["cat dog"], weighted=True)
    assert cond["encoder_hidden_states"].shape == (2, 227, 192) and cond["text_embeds"].shape == (2, 96)
    # the pooled output is chunk 0's: the same as with one 77-token chunk for the first 75 tokens
    assert torch.allclose(cond["encoder_hidden_states"][:1, :76], short["encoder_hidden_states"][:, :76], atol=1e-5)
    assert not torch.allclose(weighted["encoder_hidden_states"], plain["encoder_hidden_states"])
    assert torch.allclose(weighted["text_embeds"], plain["text_embeds"], atol=1e-5)


def test_predict_uses_size_and_crop_conditioning(sdxl_model):
    family = sdxl_model.family
    with torch.no_grad():
        cond = family.encode_prompts(sdxl_model, ["sks dog", "sks dog"])
        noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
        t = torch.tensor([500, 500])
        batch = {"original_sizes_hw": [(64, 64), (96, 64)], "crop_top_lefts": [(0, 0), (16, 0)],
                 "target_sizes_hw": [(64, 64), (64, 64)]}
        out = family.predict(sdxl_model, noisy, t, cond, batch)
        default = family.predict(sdxl_model, noisy, t, cond, None)
    ids = family.time_ids(batch, noisy)
    assert ids.tolist() == [[64, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]]
    assert family.time_ids(None, noisy).tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert torch.allclose(out[0], default[0], atol=1e-6)  # sample 0 is an uncropped 64x64 image
    assert not torch.allclose(out[1], default[1], atol=1e-4)


def test_sample_pipeline_runs(sdxl_model, tmp_path):
    from sd_scripts.training.sampling import SamplePrompt, generate_samples

    prompts = [SamplePrompt("(sks:1.2) dog", width=64, height=64, seed=1, sample_steps=2),
               SamplePrompt("cat", negative_prompt="blurry", width=64, height=96, seed=2, sample_steps=2)]
    paths = generate_samples(sdxl_model, prompts, out_dir=str(tmp_path), output_name="x", label="000001",
                             default_sampler="euler_a", v_parameterization=False, clip_skip=None, device="cpu")
    assert len(paths) == 3 and all(Path(p).is_file() for p in paths)
    from PIL import Image

    assert Image.open(paths[1]).size == (64, 96)


# ------------------------------------------------------------------------------------------ settings


def _settings(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_text_encoder_output_caching_conflicts_are_one_line_errors():
    ok, warnings = check_family_settings(_settings(cache_text_encoder_outputs=True, network_train_unet_only=True),
                                         get_family("sdxl"))
    assert ok == [] and warnings == []
    errors, _ = check_family_settings(_settings(cache_text_encoder_outputs_to_disk=True, shuffle_caption=True,
                                                caption_dropout_rate=0.1, token_warmup_step=10))
    texts = [_one_line(e, "cache_text_encoder_outputs") for e in errors]
    assert len(texts) == 4
    assert "network_train_unet_only" in texts[0]
    assert any("shuffle_caption" in t for t in texts) and any("token_warmup_step" in t for t in texts)
    assert all(e.setting == "cache_text_encoder_outputs" for e in errors)
    errors, _ = check_family_settings(_settings(cache_text_encoder_outputs=True, network_train_unet_only=True,
                                                caption_tag_dropout_rate=0.2, caption_dropout_every_n_epochs=2))
    assert len(errors) == 2


def test_caching_checks_dataset_subsets(tmp_path):
    from sd_scripts.data.dataset_layout import scan_dataset
    from tests.helpers import make_dataset

    data = make_dataset(tmp_path / "data", count=2)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{(data / "5_sks shape").as_posix()}"\n'
                    'shuffle_caption = true\n', encoding="utf-8")
    config = _settings(dataset_config=str(toml), output_dir=str(tmp_path / "out"), cache_text_encoder_outputs=True,
                       min_bucket_reso=64, max_bucket_reso=128,
                       network_train_unet_only=True)
    plan = scan_dataset(config)
    errors, _ = check_family_settings(config, get_family("sdxl"), plan)
    assert len(errors) == 1
    _one_line(errors[0], "cache_text_encoder_outputs", "5_sks shape")


def test_sdxl_warnings_and_forced_family():
    _, warnings = check_family_settings(_settings(sdxl=True, clip_skip=3, bucket_reso_steps=40, mixed_precision="fp16"))
    assert any(w.startswith("clip_skip:") for w in warnings)
    assert any(w.startswith("bucket_reso_steps:") for w in warnings)
    assert any(w.startswith("no_half_vae:") for w in warnings)
    _, warnings = check_family_settings(_settings(model_family="sdxl", mixed_precision="fp16", no_half_vae=True))
    assert warnings == []
    assert check_family_settings(_settings(clip_skip=3, bucket_reso_steps=40)) == ([], [])
    errors, _ = check_family_settings(_settings(sdxl=True, v2=True))
    _one_line(errors[0], "v2")
