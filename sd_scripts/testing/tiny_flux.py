"""A tiny FLUX.1-shaped model built in code: transformer, CLIP-L, T5 encoder + tokenizers, 16-channel VAE.

The parts have FLUX.1's structure with a few hundred thousand random weights:

* transformer: ``FluxTransformer`` in BFL's layout, hidden 64 (2 heads of 32, RoPE axes (4, 14, 14)), MLP 256,
  2 double-stream and 2 single-stream blocks, 64 packed input features, a guidance embedding for dev;
* CLIP-L: ``CLIPTextModel`` (quick_gelu, width 64: the pooled vector ``y`` is 64 wide) with the tiny CLIP tokenizer;
* T5: ``T5EncoderModel`` with gated-GELU feed-forward (T5 v1.1, as FLUX's t5xxl), width 32, and a tiny
  sentencepiece-style (Unigram) tokenizer built from a word list, written as ``tokenizer.json``;
* VAE: ``AutoencoderKL`` with 16 latent channels, no quant convs, scaling 0.3611 and shift 0.1159 (FLUX's ``ae``).

``save_tiny_flux_files(folder)`` writes what users download from BFL/ComfyUI: the transformer as a BFL single file
(``flux1-tiny-dev.safetensors``), ``clip_l.safetensors``, ``t5xxl.safetensors`` and ``ae.safetensors``, plus
tokenizers in kohya's ``tokenizer_cache_dir`` layout. ``save_tiny_flux_all_in_one`` writes ComfyUI's all-in-one
layout; ``save_tiny_flux_diffusers(folder)`` a ``FluxPipeline`` folder. Same seed, same weights in every form.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd_scripts.testing.tiny_models import TINY_WORDS, tokenizer_vocab_size, write_tiny_tokenizer

__all__ = [
    "build_tiny_flux",
    "save_tiny_flux_all_in_one",
    "save_tiny_flux_diffusers",
    "save_tiny_flux_files",
    "tiny_flux_params",
    "write_tiny_t5_tokenizer",
]

CLIP_CACHE_NAME = "openai_clip-vit-large-patch14"
T5_CACHE_NAME = "google_t5-v1_1-xxl"
T5_MAX_LENGTH = 512


def tiny_flux_params(dev: bool = True):
    from sd_scripts.models.flux.transformer import FluxParams

    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                      num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14), guidance_embed=dev)


def write_tiny_t5_tokenizer(folder: str | os.PathLike):
    """A T5 tokenizer (Unigram, ``</s>`` appended, ``<pad>`` id 0) whose words are ``TINY_WORDS``; returns it."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("".join(TINY_WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789,.()!?:'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    vocab += [(c, -5.0) for c in letters] + [("\u2581" + c, -4.0) for c in letters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)


def build_tiny_flux(dev: bool = True, seed: int = 0, clip_tokenizer_dir=None, t5_tokenizer_dir=None) -> dict:
    """``dict(transformer, text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae, params)`` with random weights.

    The tokenizers are written to the given folders (temporary ones when None)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sd_scripts.models.flux.transformer import FluxTransformer

    clip_dir = Path(clip_tokenizer_dir or tempfile.mkdtemp(prefix="tiny_clip_"))
    t5_dir = Path(t5_tokenizer_dir or tempfile.mkdtemp(prefix="tiny_t5_"))
    write_tiny_tokenizer(clip_dir)
    tokenizer = _clip_tokenizer(clip_dir)
    tokenizer_2 = write_tiny_t5_tokenizer(t5_dir)
    params = tiny_flux_params(dev)
    torch.manual_seed(seed)
    transformer = FluxTransformer(params)
    with torch.no_grad():  # BFL initialises some layers to zero; random weights make every block matter in tests
        for parameter in transformer.parameters():
            parameter.normal_(0.0, 0.1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer_vocab_size(clip_dir), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, tie_word_embeddings=False))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    return {"transformer": transformer, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "vae": vae, "params": params}


def _tokenizer_cache(folder: Path) -> tuple[Path, Path]:
    """kohya's ``tokenizer_cache_dir`` layout: ``<dir>/<hub repo id with "/" -> "_">``."""
    return folder / "tokenizer_cache" / CLIP_CACHE_NAME, folder / "tokenizer_cache" / T5_CACHE_NAME


def _save(path: Path, state: dict, dtype=None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _ae_state(vae) -> dict:
    """The VAE in BFL's ``ae.safetensors`` layout: LDM names without ``first_stage_model.``."""
    from sd_scripts.models.ldm_convert import vae_to_ldm

    return {k.split(".", 1)[1]: v for k, v in vae_to_ldm(vae.state_dict()).items()}


def _clip_state(text_encoder) -> dict:
    """CLIP-L as ComfyUI's ``clip_l.safetensors``: transformers names under ``text_model.``."""
    from sd_scripts.models.ldm_convert import clip_to_ldm

    return clip_to_ldm(text_encoder.state_dict(), prefix="")


def _t5_state(text_encoder) -> dict:
    """T5 as ``t5xxl_fp16.safetensors``: transformers names, the tied ``encoder.embed_tokens`` stored once as ``shared``."""
    return {k: v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


def save_tiny_flux_files(folder: str | os.PathLike, dev: bool = True, seed: int = 0, transformer_dtype=None,
                         prefixed: bool = False) -> dict[str, Path]:
    """Write the separate files kohya's ``pretrained_model_name_or_path`` / ``clip_l`` / ``t5xxl`` / ``ae`` take.

    ``transformer_dtype`` e.g. ``torch.float8_e4m3fn`` writes the transformer as ComfyUI's fp8 files do;
    ``prefixed`` keys it under ``model.diffusion_model.``. Returns ``{"transformer", "clip_l", "t5xxl", "ae",
    "tokenizer_cache_dir"}`` paths.
    """
    folder = Path(folder)
    clip_dir, t5_dir = _tokenizer_cache(folder)
    parts = build_tiny_flux(dev, seed, clip_dir, t5_dir)
    prefix = "model.diffusion_model." if prefixed else ""
    name = f"flux1-tiny-{'dev' if dev else 'schnell'}.safetensors"
    return {
        "transformer": _save(folder / name, {prefix + k: v for k, v in parts["transformer"].state_dict().items()},
                             transformer_dtype),
        "clip_l": _save(folder / "clip_l.safetensors", _clip_state(parts["text_encoder"])),
        "t5xxl": _save(folder / "t5xxl.safetensors", _t5_state(parts["text_encoder_2"])),
        "ae": _save(folder / "ae.safetensors", _ae_state(parts["vae"])),
        "tokenizer_cache_dir": folder / "tokenizer_cache",
    }


def save_tiny_flux_all_in_one(path: str | os.PathLike, dev: bool = True, seed: int = 0) -> Path:
    """ComfyUI's all-in-one checkpoint layout: ``model.diffusion_model.*``, ``text_encoders.clip_l.transformer.*``,
    ``text_encoders.t5xxl.transformer.*`` and ``vae.*``; tokenizers in ``<folder>/tokenizer_cache``."""
    path = Path(path)
    clip_dir, t5_dir = _tokenizer_cache(path.parent)
    parts = build_tiny_flux(dev, seed, clip_dir, t5_dir)
    state = {"model.diffusion_model." + k: v for k, v in parts["transformer"].state_dict().items()}
    state |= {"text_encoders.clip_l.transformer." + k: v for k, v in _clip_state(parts["text_encoder"]).items()}
    state |= {"text_encoders.t5xxl.transformer." + k: v for k, v in _t5_state(parts["text_encoder_2"]).items()}
    state |= {"vae." + k: v for k, v in _ae_state(parts["vae"]).items()}
    return _save(path, state)


def save_tiny_flux_diffusers(folder: str | os.PathLike, dev: bool = True, seed: int = 0) -> Path:
    """A diffusers ``FluxPipeline`` folder with the same weights (transformer converted to diffusers' names)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from sd_scripts.models.flux.diffusers_keys import bfl_to_diffusers

    folder = Path(folder)
    scratch = Path(tempfile.mkdtemp(prefix="tiny_flux_tok_"))
    parts = build_tiny_flux(dev, seed, scratch / "clip", scratch / "t5")
    params = parts["params"]
    transformer = FluxTransformer2DModel(
        in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed, axes_dims_rope=tuple(params.axes_dim))
    transformer.load_state_dict(bfl_to_diffusers(parts["transformer"].state_dict()), strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    if not dev:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=parts["vae"], text_encoder=parts["text_encoder"],
                        tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_2"],
                        tokenizer_2=parts["tokenizer_2"], transformer=transformer)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
