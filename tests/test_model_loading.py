"""Model families, loading (single file + yaml, .ckpt, diffusers), text encoding and the diffusers -> LDM converter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, ModelLoadError
from sd_scripts.models.families import FAMILIES, ModelFamily, get_family, register_family
from sd_scripts.models.loading import detect_family, load_model, load_tokenizer, load_vae
from sd_scripts.models.text_encoding import (
    chunk_ids,
    encode_tokens,
    parse_prompt_attention,
    tokenize_prompts,
)
from sd_scripts.testing.tiny_models import (
    TOKENIZER_CACHE_NAMES,
    build_tiny_components,
    save_tiny_single_file,
    tiny_tokenizer_cache_dir,
)

SETTING = "pretrained_model_name_or_path"


def _cfg(path, **kw) -> TrainConfig:
    if "tokenizer_cache_dir" not in kw and Path(path).is_file():
        kw["tokenizer_cache_dir"] = str(tiny_tokenizer_cache_dir(path))
    return TrainConfig(pretrained_model_name_or_path=str(path), **kw)


def _reference(family: str, seed: int = 0):
    """The original tiny components (same seed -> same weights as the saved files)."""
    return build_tiny_components(family, seed=seed)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _one_line(err: Exception, *names: str) -> str:
    text = str(err)
    assert "\n" not in text
    for name in names:
        assert name in text
    return text


@pytest.fixture(scope="module")
def sd1_model(tiny_sd1_single_file):
    return load_model(_cfg(tiny_sd1_single_file))


@pytest.fixture(scope="module")
def sd2_model(tiny_sd2_single_file):
    return load_model(_cfg(tiny_sd2_single_file))


# ------------------------------------------------------------------------------------------------ families


def test_family_registry_and_facts():
    assert set(FAMILIES) >= {"sd1", "sd2"}
    sd1, sd2 = get_family("sd1"), get_family("SD2")
    assert sd1.latent_scale == sd2.latent_scale == 0.18215
    assert sd1.bucket_step == sd2.bucket_step == 64
    assert sd1.te_lora_prefixes == sd2.te_lora_prefixes == ["lora_te"]
    assert (sd1.resolution_for(False), sd2.resolution_for(False), sd2.resolution_for(True)) == (512, 512, 768)
    assert sd1.default_resolution == 512
    assert [sd1.base_model_version(v) for v in (False, True)] == ["sd_v1", "sd_v1_v"]
    assert [sd2.base_model_version(v) for v in (False, True)] == ["sd_v2", "sd_v2_v"]
    assert (sd1.ss_v2, sd2.ss_v2) == (False, True)
    assert sd1.modelspec_architecture(False) == "stable-diffusion-v1/lora"
    assert sd2.modelspec_architecture(False) == "stable-diffusion-v2-512/lora"
    assert sd2.modelspec_architecture(True) == "stable-diffusion-v2-768-v/lora"
    with pytest.raises(ConfigError) as e:
        get_family("sd3")
    _one_line(e.value, "model_family", "sd1", "sd2", "sdxl")

    class Dup(ModelFamily):
        name = "sd1"

    with pytest.raises(ValueError):
        register_family(Dup())


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_loads_exact(family, request):
    folder = request.getfixturevalue(f"tiny_{family}_diffusers")
    fam, info = detect_family(_cfg(folder))
    assert fam.name == family and info["kind"] == "diffusers"
    assert info["v_parameterization"] is (family == "sd2")  # the tiny sd2 folder is v-prediction
    model = load_model(_cfg(folder))
    ref = _reference(family)
    for a, b in ((model.unet, ref["unet"]), (model.vae, ref["vae"]), (model.text_encoder, ref["text_encoder"])):
        _assert_same_weights(a, b)
    assert model.tokenizer.pad_token_id == (0 if family == "sd2" else model.tokenizer.eos_token_id)
    assert model.model_path == os.path.realpath(folder)
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_single_file_safetensors_with_yaml_exact(tiny_sd1_single_file, sd1_model):
    fam, info = detect_family(_cfg(tiny_sd1_single_file))
    assert fam.name == "sd1"
    assert info["kind"] == "single_file" and info["format"] == "safetensors"
    assert info["yaml"].endswith("model.yaml") and info["v_parameterization"] is False
    ref = _reference("sd1")
    _assert_same_weights(sd1_model.unet, ref["unet"])
    _assert_same_weights(sd1_model.vae, ref["vae"])
    _assert_same_weights(sd1_model.text_encoder, ref["text_encoder"])
    assert sd1_model.family is fam and sd1_model.v_parameterization is False
    assert sd1_model.unet.config.sample_size == 32  # from the yaml's image_size


def test_ckpt_with_yaml_exact(tmp_path):
    path = save_tiny_single_file(tmp_path / "tiny.ckpt", "sd1", seed=3, fmt="ckpt")
    fam, info = detect_family(_cfg(path))
    assert fam.name == "sd1" and info["format"] == "ckpt"
    model = load_model(_cfg(path))
    ref = _reference("sd1", seed=3)
    _assert_same_weights(model.unet, ref["unet"])
    _assert_same_weights(model.text_encoder, ref["text_encoder"])
    _assert_same_weights(model.vae, ref["vae"])


def test_sd2_v_prediction_single_file(tiny_sd2_single_file, sd2_model):
    from safetensors import safe_open

    with safe_open(str(tiny_sd2_single_file), "pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight" in keys  # the extra block...
    assert sd2_model.text_encoder.config.num_hidden_layers == 3  # ...dropped on load, as kohya does
    assert sd2_model.family.name == "sd2" and sd2_model.v_parameterization is True
    ref = _reference("sd2")
    _assert_same_weights(sd2_model.unet, ref["unet"])
    _assert_same_weights(sd2_model.text_encoder, ref["text_encoder"])
    assert sd2_model.unet.config.use_linear_projection is True
    assert sd2_model.tokenizer.pad_token_id == 0
    assert sd2_model.family.base_model_version(sd2_model.v_parameterization) == "sd_v2_v"


def test_single_file_and_diffusers_predict_the_same(sd1_model, tiny_sd1_diffusers):
    other = load_model(_cfg(tiny_sd1_diffusers))
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    with torch.no_grad():
        outs = []
        for model in (sd1_model, other):
            cond = model.family.encode_prompts(model, ["a photo of sks dog"], None, None)
            outs.append(model.family.predict(model, latents, t, cond, {}))
    assert outs[0].shape == latents.shape
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_v_parameterization_and_family_settings(tiny_sd1_single_file, tiny_sd2_single_file):
    _, info = detect_family(_cfg(tiny_sd1_single_file, v_parameterization=True))
    assert info["v_parameterization"] is True and info["v_source"] == "setting"
    _, info = detect_family(_cfg(tiny_sd2_single_file, v2=False))  # kohya's default claims nothing
    assert info["family"] == "sd2"
    fam, _ = detect_family(_cfg(tiny_sd2_single_file, v2=True, model_family="sd2"))
    assert fam.name == "sd2"
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sd1_single_file, v2=True))
    _one_line(e.value, "v2")
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sd1_single_file, model_family="sd2"))
    _one_line(e.value, "model_family")
    with pytest.raises(ConfigError) as e:
        detect_family(_cfg(tiny_sd1_single_file, model_family="sd3"))
    _one_line(e.value, "model_family", "sd1, sd2")


def test_detect_family_reads_only_the_header(tiny_sd2_single_file, monkeypatch):
    import sd_scripts.models.loading as ml

    def boom(*a, **k):
        raise AssertionError("detect_family must not read the tensors of a .safetensors file")

    monkeypatch.setattr(ml, "read_checkpoint", boom)
    fam, info = detect_family(_cfg(tiny_sd2_single_file))
    assert fam.name == "sd2" and info["v_parameterization"] is True


def test_v_from_modelspec_metadata_without_yaml(tmp_path, tiny_sd2_single_file):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "vmodel.safetensors"
    save_file(load_file(str(tiny_sd2_single_file)), str(path), metadata={"modelspec.prediction_type": "v"})
    fam, info = detect_family(_cfg(path, tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(tiny_sd2_single_file))))
    assert fam.name == "sd2" and info["yaml"] is None and info["v_parameterization"] is True


def test_sd2_without_yaml_warns_about_v(tmp_path, tiny_sd2_single_file):
    path = tmp_path / "sd2.safetensors"
    shutil.copy(tiny_sd2_single_file, path)
    fam, info = detect_family(_cfg(path, tokenizer_cache_dir=str(tmp_path)))
    assert fam.name == "sd2" and info["v_parameterization"] is False and info["v_source"] == "default"
    assert len(info["warnings"]) == 1 and "v_parameterization" in info["warnings"][0]
    _, info = detect_family(_cfg(path, v_parameterization=True))
    assert info["warnings"] == []


def test_tiny_checkpoint_without_yaml_needs_one(tmp_path, tiny_sd1_single_file):
    path = tmp_path / "noyaml.safetensors"
    shutil.copy(tiny_sd1_single_file, path)
    cfg = _cfg(path, tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(tiny_sd1_single_file)))
    assert detect_family(cfg)[0].name == "sd1"  # detected from keys (context dim is not 768 here)
    with pytest.raises(ModelLoadError) as e:
        load_model(cfg)
    _one_line(e.value, SETTING, "noyaml.yaml")


# ----------------------------------------------------------------------------------------- errors on loading


def test_missing_and_unusable_paths(tmp_path):
    cases = [
        TrainConfig(),
        _cfg(tmp_path / "nope.safetensors"),
        _cfg(tmp_path),  # a folder that is not a diffusers model
        _cfg("someone/not-cached-model"),  # a hub id, offline and not cached
        _cfg("models/typo.safetensors"),  # a relative file path, not a hub id
    ]
    (tmp_path / "model.gguf").write_bytes(b"xx")
    cases.append(_cfg(tmp_path / "model.gguf"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00")
    cases.append(_cfg(tmp_path / "broken.safetensors"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle" * 10)
    cases.append(_cfg(tmp_path / "junk.ckpt"))
    for cfg in cases:
        with pytest.raises(ModelLoadError) as e:
            load_model(cfg)
        _one_line(e.value, SETTING)
        assert e.value.setting == SETTING


def test_unknown_family_one_line(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelLoadError) as e:
        detect_family(_cfg(lora))
    _one_line(e.value, SETTING, "LoRA")
    refiner = tmp_path / "xl_refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}, str(refiner))
    with pytest.raises(ModelLoadError) as e:
        detect_family(_cfg(refiner))
    _one_line(e.value, SETTING, "SDXL refiner", "sd1, sd2, sdxl")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Evil()}, str(path))
    with pytest.raises(ModelLoadError) as e:
        load_model(_cfg(path, tokenizer_cache_dir=str(tmp_path)))
    _one_line(e.value, SETTING, "refused", ".safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_lookup_order(tmp_path, tiny_sd1_single_file, tiny_sd2_diffusers, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd1, sd2 = get_family("sd1"), get_family("sd2")
    kohya_cache = tiny_tokenizer_cache_dir(tiny_sd1_single_file)
    # 1. the diffusers folder's tokenizer wins over tokenizer_cache_dir
    tok = load_tokenizer(sd2, _cfg(tiny_sd2_diffusers, tokenizer_cache_dir=str(kohya_cache)), tiny_sd2_diffusers)
    assert tok.pad_token_id == 0
    # 2. tokenizer_cache_dir in kohya's layout, and the folder itself
    tok = load_tokenizer(sd1, _cfg(tiny_sd1_single_file))
    assert tok.pad_token_id == tok.eos_token_id
    tok = load_tokenizer(sd1, _cfg(tiny_sd1_single_file, tokenizer_cache_dir=str(kohya_cache / TOKENIZER_CACHE_NAMES["sd1"])))
    assert tok("a photo").input_ids[0] == tok.bos_token_id
    # 3. nothing found offline: one line naming tokenizer_cache_dir
    for cache in (None, str(tmp_path / "empty")):
        with pytest.raises(ModelLoadError) as e:
            load_model(_cfg(tiny_sd1_single_file, tokenizer_cache_dir=cache))
        _one_line(e.value, "tokenizer_cache_dir", "openai/clip-vit-large-patch14")
        assert e.value.setting == "tokenizer_cache_dir"


# ------------------------------------------------------------------------------------------------------- VAE


def test_vae_override_forms(tmp_path, tiny_sd1_single_file, tiny_sd1_diffusers, sd1_model):
    from safetensors.torch import save_file

    from sd_scripts.models.ldm_convert import vae_to_ldm

    other = build_tiny_components("sd1", seed=7)["vae"]
    ldm = {k: v.contiguous() for k, v in vae_to_ldm(other.state_dict()).items()}  # first_stage_model.*
    bare = {k[len("first_stage_model."):]: v for k, v in ldm.items()}
    save_file(ldm, str(tmp_path / "prefixed.safetensors"))
    save_file(bare, str(tmp_path / "bare.safetensors"))
    torch.save({"state_dict": bare}, str(tmp_path / "bare.pt"))
    torch.save(ldm, str(tmp_path / "prefixed.ckpt"))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "diffusers_keys.safetensors"))
    other.save_pretrained(str(tmp_path / "vae_folder"))
    base_config = dict(sd1_model.vae.config)
    for name in ("prefixed.safetensors", "bare.safetensors", "bare.pt", "prefixed.ckpt", "diffusers_keys.safetensors",
                 "vae_folder"):
        vae = load_vae(str(tmp_path / name), base_config)
        _assert_same_weights(vae, other)
    # a full model checkpoint and a whole diffusers folder (vae/ subfolder) work too
    _assert_same_weights(load_vae(str(tiny_sd1_single_file), base_config), sd1_model.vae)
    _assert_same_weights(load_vae(str(tiny_sd1_diffusers)), sd1_model.vae)
    model = load_model(_cfg(tiny_sd1_single_file, vae=str(tmp_path / "bare.pt")))
    _assert_same_weights(model.vae, other)
    with pytest.raises(ModelLoadError) as e:
        load_model(_cfg(tiny_sd1_single_file, vae=str(tmp_path / "missing.safetensors")))
    _one_line(e.value, "vae")
    assert e.value.setting == "vae"


# --------------------------------------------------------------------------------------------- text encoding


@pytest.mark.parametrize("max_len, chunks, states", [(None, 1, 77), (75, 1, 77), (150, 2, 152), (225, 3, 227)])
def test_chunk_shapes(sd1_model, sd2_model, max_len, chunks, states):
    long_caption = ", ".join(["a photo of sks dog"] * 60)
    for model in (sd1_model, sd2_model):
        tokens = tokenize_prompts(model.tokenizer, ["cat", long_caption], max_len)
        assert tuple(tokens.input_ids.shape) == (2, chunks, 77)
        ids = tokens.input_ids
        assert (ids[:, :, 0] == model.tokenizer.bos_token_id).all()
        assert (ids[1, :, -1] == model.tokenizer.eos_token_id).all()  # full chunks end in EOS
        with torch.no_grad():
            cond = model.family.encode_prompts(model, ["cat", long_caption], None, max_len)
        assert tuple(cond["encoder_hidden_states"].shape) == (2, states, 64)


def test_chunks_stitch_like_kohya(sd1_model):
    tok, te = sd1_model.tokenizer, sd1_model.text_encoder
    tokens = tokenize_prompts(tok, ["red dog, " * 50], 150)
    with torch.no_grad():
        merged = encode_tokens(te, tokens)
        per_chunk = te(tokens.input_ids[0])[0]  # [2, 77, D]
    torch.testing.assert_close(merged[0, 0], per_chunk[0, 0])
    torch.testing.assert_close(merged[0, 1:76], per_chunk[0, 1:76])
    torch.testing.assert_close(merged[0, 76:151], per_chunk[1, 1:76])
    torch.testing.assert_close(merged[0, 151], per_chunk[1, 76])


def test_chunk_ids_sd2_fixup():
    bos, eos, pad = 100, 101, 0
    body = list(range(1, 91))  # 90 tokens: chunk 1 full, chunk 2 has 15
    ids = [bos] + body + [eos] + [pad] * (152 - 92)
    first, second = chunk_ids(ids, bos, eos, pad)
    assert first == [bos] + body[:75] + [eos]  # last real position is a token -> EOS at the end
    assert second[:18] == [bos] + body[75:] + [eos, pad] and second[-1] == pad and len(second) == 77
    empty = chunk_ids([bos, 5, eos] + [pad] * 149, bos, eos, pad)[1]
    assert empty[:3] == [bos, eos, pad]  # an empty chunk becomes BOS EOS PAD ...
    sd1 = chunk_ids([bos, 5, eos] + [eos] * 149, bos, eos, eos)[1]
    assert sd1 == [bos] + [eos] * 76


def test_max_token_length_must_be_allowed(sd1_model):
    with pytest.raises(ConfigError) as e:
        tokenize_prompts(sd1_model.tokenizer, ["x"], 100)
    _one_line(e.value, "max_token_length")


def test_clip_skip(sd1_model):
    te, tok = sd1_model.text_encoder, sd1_model.tokenizer
    tokens = tokenize_prompts(tok, ["a photo of sks person"])
    with torch.no_grad():
        default = encode_tokens(te, tokens)
        one = encode_tokens(te, tokens, clip_skip=1)
        two = encode_tokens(te, tokens, clip_skip=2)
        out = te(tokens.input_ids[:, 0], output_hidden_states=True)
        expected = te.final_layer_norm(out.hidden_states[-2])
    assert not hasattr(te, "text_model") or hasattr(te.text_model, "final_layer_norm")
    torch.testing.assert_close(default, out.last_hidden_state)
    torch.testing.assert_close(one, default)
    torch.testing.assert_close(two, expected)
    assert not torch.allclose(two, default)
    with pytest.raises(ConfigError) as e:
        encode_tokens(te, tokens, clip_skip=4)  # 3 layers
    _one_line(e.value, "clip_skip", "1-3")


def test_encode_prompts_keeps_gradients(sd1_model):
    te = sd1_model.text_encoder
    te.requires_grad_(True)
    try:
        cond = sd1_model.family.encode_prompts(sd1_model, ["dog"], 2, None)
        assert cond["encoder_hidden_states"].requires_grad
        with torch.no_grad():
            assert not sd1_model.family.encode_prompts(sd1_model, ["dog"], 2, None)["encoder_hidden_states"].requires_grad
    finally:
        te.requires_grad_(False)


def test_parse_prompt_attention():
    assert parse_prompt_attention("a photo") == [("a photo", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("a (dog) cat") == [("a ", 1.0), ("dog", pytest.approx(1.1)), (" cat", 1.0)]
    assert parse_prompt_attention("((dog))") == [("dog", pytest.approx(1.21))]
    assert parse_prompt_attention("[dog]") == [("dog", pytest.approx(1 / 1.1))]
    assert parse_prompt_attention("(dog:1.3), cat") == [("dog", pytest.approx(1.3)), (", cat", 1.0)]
    assert parse_prompt_attention("(red (dog:1.5))") == [("red ", pytest.approx(1.1)), ("dog", pytest.approx(1.65))]
    assert parse_prompt_attention(r"\(literal\) (x: 0.5 )") == [("(literal) ", 1.0), ("x", pytest.approx(0.5))]
    assert parse_prompt_attention("time: 10) a") == [("time: 10) a", 1.0)]  # no opener: all literal
    assert parse_prompt_attention("(unclosed dog") == [("unclosed dog", pytest.approx(1.1))]
    assert parse_prompt_attention("(a:b)") == [("a:b", pytest.approx(1.1))]


def test_weighted_tokens_align(sd1_model):
    tok = sd1_model.tokenizer
    plain = tokenize_prompts(tok, ["a photo of sks dog"], None, weighted=False)
    weighted = tokenize_prompts(tok, ["a photo of sks dog"], None, weighted=True)
    assert torch.equal(plain.input_ids, weighted.input_ids) and torch.all(weighted.weights == 1)
    tokens = tokenize_prompts(tok, ["a photo of (sks dog:1.5), [cat]"], 150, weighted=True)
    assert tuple(tokens.weights.shape) == (1, 2, 77)
    ids, weights = tokens.input_ids[0, 0].tolist(), tokens.weights[0, 0].tolist()
    dog_ids = tok("sks dog", add_special_tokens=False).input_ids
    start = ids.index(dog_ids[0])
    assert weights[start:start + len(dog_ids)] == pytest.approx([1.5] * len(dog_ids))
    cat = ids.index(tok("cat", add_special_tokens=False).input_ids[0])
    assert weights[cat] == pytest.approx(1 / 1.1)
    assert weights[0] == 1.0 and weights[-1] == 1.0
    unweighted_ids = tokenize_prompts(tok, ["a photo of sks dog, cat"], 150).input_ids
    with torch.no_grad():
        w = encode_tokens(sd1_model.text_encoder, tokens)
        manual = encode_tokens(sd1_model.text_encoder, type(tokens)(tokens.input_ids))
    merged_w = torch.cat([tokens.weights[:, 0, :1], tokens.weights[:, 0, 1:76], tokens.weights[:, 1, 1:76],
                          tokens.weights[:, 1, -1:]], dim=1)
    torch.testing.assert_close(w, manual * merged_w[..., None])
    assert unweighted_ids.shape == tokens.input_ids.shape


def test_sample_pipeline_runs(sd1_model):
    import diffusers

    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False)
    pipe = sd1_model.family.build_pipeline(sd1_model, scheduler)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and pipe.safety_checker is None
    pipe.set_progress_bar_config(disable=True)
    long_prompt = "(a photo:1.2) of sks dog, " * 20  # > 75 tokens: two chunks
    image = pipe(long_prompt, negative_prompt="[blurry]", width=32, height=32, num_inference_steps=2,
                 guidance_scale=5.0, clip_skip=1, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)


# -------------------------------------------------------------------------------------------- LDM converter


def test_tiny_ldm_round_trip_through_diffusers(tiny_sd1_single_file, tiny_sd2_single_file):
    import yaml
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
        infer_diffusers_model_type,
    )
    from safetensors.torch import load_file

    for family, path in (("sd1", tiny_sd1_single_file), ("sd2", tiny_sd2_single_file)):
        ldm = load_file(str(path))
        original = yaml.safe_load(Path(path).with_suffix(".yaml").read_text())
        ref = _reference(family)
        unet_cfg = create_unet_diffusers_config_from_ldm(original, ldm)
        for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                    "use_linear_projection", "cross_attention_dim", "layers_per_block"):
            assert _as_list(unet_cfg[key]) == _as_list(ref["unet"].config[key]), key
        unet = convert_ldm_unet_checkpoint(ldm, unet_cfg)
        vae = convert_ldm_vae_checkpoint(ldm, create_vae_diffusers_config_from_ldm(original, ldm))
        for converted, module in ((unet, ref["unet"]), (vae, ref["vae"])):
            expected = module.state_dict()
            assert converted.keys() == expected.keys()
            for key in expected:
                assert torch.equal(converted[key], expected[key]), key
        te_expected = ref["text_encoder"].state_dict()
        if family == "sd1":
            te = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}
            assert te.keys() == te_expected.keys()
        else:
            te = {k.removeprefix("text_model."): v
                  for k, v in convert_open_clip_checkpoint(ref["text_encoder"], ldm).items()}
            # diffusers drops only a 24th block by name; the tiny file's extra block 3 is what our loader drops
            assert set(te) - set(te_expected) == {k for k in te if k.startswith("encoder.layers.3.")}
        for key in te_expected:
            assert torch.equal(te[key], te_expected[key]), key
        assert infer_diffusers_model_type(ldm) == "v1"  # the tiny model has no 1024-wide context


def _meta_sd15():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd1 = get_family("sd1")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sd1.diffusers_unet_config())
        vae = AutoencoderKL.from_config(sd1.diffusers_vae_config())
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=49406,
                                          eos_token_id=49407, pad_token_id=49407, vocab_size=49408))
    return unet, vae, te


def test_full_size_sd15_keys_on_meta_device():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
        infer_diffusers_model_type,
    )

    from sd_scripts.models.ldm_convert import models_to_ldm, unet_ldm_key_map, vae_ldm_key_map

    unet, vae, te = _meta_sd15()
    ldm = models_to_ldm(unet, vae, te, "clip")
    for key in ("model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.encoder.norm_out.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in ldm, key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    assert infer_diffusers_model_type(ldm) == "v1"
    original = get_family("sd1").builtin_ldm_config()
    unet_cfg = create_unet_diffusers_config_from_ldm(original, ldm)
    back = convert_ldm_unet_checkpoint(ldm, unet_cfg)
    expected = unet.state_dict()
    assert back.keys() == expected.keys()
    assert all(back[k].shape == expected[k].shape for k in expected)
    back = convert_ldm_vae_checkpoint(ldm, create_vae_diffusers_config_from_ldm(original, ldm))
    expected = vae.state_dict()
    assert back.keys() == expected.keys()
    assert all(back[k].shape == expected[k].shape for k in expected)
    # key maps: every parameter, values are the checkpoint's keys
    key_map = unet_ldm_key_map(unet.config)
    assert set(key_map) == set(unet.state_dict()) and set(key_map.values()) == {k for k in ldm if k.startswith("model.")}
    assert key_map["down_blocks.1.downsamplers.0.conv.weight"] == "model.diffusion_model.input_blocks.6.0.op.weight"
    assert set(vae_ldm_key_map(vae.config).values()) == {k for k in ldm if k.startswith("first_stage_model.")}


def test_full_size_sd2_openclip_on_meta_device():
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models.ldm_convert import openclip_from_ldm, openclip_to_ldm

    with init_empty_weights():
        te = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, hidden_act="gelu", projection_dim=512,
                                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0, vocab_size=49408))
    ldm = openclip_to_ldm(te.state_dict())
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm  # 24 blocks, like SD2 files
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert ldm["cond_stage_model.model.text_projection"].shape == (1024, 1024)
    expected = {k: v.shape for k, v in te.state_dict().items()}
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(te, ldm).items()}
    assert {k: v.shape for k, v in back.items()} == expected
    ours = openclip_from_ldm(ldm)
    assert {k: v.shape for k, v in ours.items()} == expected


def test_text_encoder_key_maps(sd2_model, tiny_sd2_single_file, sd1_model, tiny_sd1_single_file):
    from safetensors.torch import load_file

    from sd_scripts.models.ldm_convert import qkv_chunk_index, text_encoder_ldm_key_map, unet_ldm_key_map

    ldm = load_file(str(tiny_sd2_single_file))
    te = sd2_model.text_encoder
    key_map = text_encoder_ldm_key_map(te, "openclip")
    hidden = te.config.hidden_size
    for name, param in te.state_dict().items():
        target = ldm[key_map[name]]
        index = qkv_chunk_index(name)
        if index is not None:
            target = target[index * hidden:(index + 1) * hidden]
        assert torch.equal(param, target.reshape(param.shape)), name
    assert key_map["encoder.layers.0.self_attn.k_proj.weight"].endswith("resblocks.0.attn.in_proj_weight")
    ldm1 = load_file(str(tiny_sd1_single_file))
    for mapping, module in ((text_encoder_ldm_key_map(sd1_model.text_encoder.config, "clip"), sd1_model.text_encoder),
                            (unet_ldm_key_map(sd1_model.unet), sd1_model.unet)):
        for name, param in module.state_dict().items():
            if name in mapping:
                assert torch.equal(param, ldm1[mapping[name]]), name
        assert set(mapping) == {n for n in module.state_dict() if not n.endswith("position_ids")}


def test_full_size_builtin_configs_on_meta_device():
    """A yaml-less full-size checkpoint: built-in LDM configs, old-style CLIP keys, SD2's 24th block dropped."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    import sd_scripts.models.loading as ml
    from sd_scripts.models.ldm_convert import models_to_ldm

    unet, vae, te = _meta_sd15()
    ldm = models_to_ldm(unet, vae, te, "clip")
    ldm = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in ldm.items()}
    ldm["cond_stage_model.transformer.embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.long, device="meta")
    sd1 = get_family("sd1")
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert ml._family_of_single_file("sd15.safetensors", shapes) is sd1
    loaded = ml._unet_from_ldm(ldm, sd1.builtin_ldm_config(False), "sd15", "fix", torch.float32)
    assert (loaded.config.sample_size, loaded.config.attention_head_dim, loaded.config.cross_attention_dim) == (64, 8, 768)
    assert loaded.config.use_linear_projection is False
    te1 = ml._text_encoder_from_ldm(sd1, ldm, None, "sd15", torch.float32)
    assert (te1.config.num_hidden_layers, te1.config.num_attention_heads, te1.config.hidden_act) == (12, 12, "quick_gelu")

    sd2 = get_family("sd2")
    with init_empty_weights():
        unet2 = UNet2DConditionModel.from_config(sd2.diffusers_unet_config(True))
        vae2 = AutoencoderKL.from_config(sd2.diffusers_vae_config(True))
        te2 = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                           num_attention_heads=16, hidden_act="gelu", vocab_size=49408,
                                           bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
    ldm2 = models_to_ldm(unet2, vae2, te2, "openclip")
    assert infer_diffusers_model_type(ldm2) == "v2"
    shapes = {k: tuple(v.shape) for k, v in ldm2.items()}
    assert ml._family_of_single_file("sd21.safetensors", shapes) is sd2
    loaded = ml._unet_from_ldm(ldm2, sd2.builtin_ldm_config(True), "sd21", "fix", torch.float32)
    assert loaded.config.sample_size == 96 and list(loaded.config.attention_head_dim) == [5, 10, 20, 20]
    assert loaded.config.use_linear_projection is True and loaded.config.cross_attention_dim == 1024
    te_loaded = ml._text_encoder_from_ldm(sd2, ldm2, None, "sd21", torch.float32)
    assert (te_loaded.config.num_hidden_layers, te_loaded.config.num_attention_heads) == (23, 16)
    assert te_loaded.config.hidden_act == "gelu"


def test_a_hub_id_already_in_the_hugging_face_cache_loads_offline(tmp_path, tiny_sdxl_diffusers, monkeypatch):
    """A model downloaded earlier (``models--org--name/snapshots/<hash>`` with ``refs/main``) is found by its hub id
    without a network, as a user of a machine that went offline expects; its detection reads the cached configs."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-sdxl"
    shutil.copytree(tiny_sdxl_diffusers, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    cfg = _cfg("tiny-org/tiny-sdxl")
    family, _ = detect_family(cfg)
    assert family.name == "sdxl"
    model = load_model(cfg)
    assert model.family.name == "sdxl" and model.text_encoder_2 is not None
    with pytest.raises(ModelLoadError) as e:  # another id, not cached: one line naming the setting
        load_model(_cfg("tiny-org/other"))
    _one_line(e.value, SETTING, "tiny-org/other")
