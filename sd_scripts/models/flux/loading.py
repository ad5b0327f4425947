"""Finding and loading FLUX.1's parts: the transformer, CLIP-L, T5-XXL, the 16-channel VAE (``ae``) and their
tokenizers, from the forms users download.

* ``pretrained_model_name_or_path``: a BFL single file (``flux1-dev.safetensors``; keys with or without ComfyUI's
  ``model.diffusion_model.`` prefix; float8 e4m3fn files are upcast to the training dtype as they load), a ComfyUI
  all-in-one file that also holds ``text_encoders.clip_l.transformer.*``, ``text_encoders.t5xxl.transformer.*`` and
  ``vae.*``, or a diffusers ``FluxPipeline`` folder;
* ``clip_l``, ``t5xxl``, ``ae`` (kohya's settings): separate files, used in place of (or where the model lacks) its own.

dev vs schnell: dev embeds the guidance scale (``guidance_in.*``); ``flux_variant`` overrides what the weights say.
Every part is built on the meta device and receives its weights already cast (one copy of each part in memory).
Tokenizers never reach the network when offline: CLIP as for SD (``tokenizer_cache_dir``, the Hugging Face cache);
T5 from the diffusers folder's ``tokenizer_2/``, ``tokenizer_cache_dir`` (``<dir>/google_t5-v1_1-xxl``), or the cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ModelLoadError
from sd_scripts.models.checkpoint_io import (
    SETTING,
    LoadedModel,
    build_module,
    hf_cache_dir,
    load_error,
    offline,
    read_checkpoint,
)
from sd_scripts.models.flux.detection import AIO_PREFIXES
from sd_scripts.models.flux.diffusers_keys import diffusers_to_bfl
from sd_scripts.models.flux.transformer import FluxTransformer, params_from_state_dict, strip_bfl_prefix

__all__ = ["clip_config_from_state", "load_flux", "load_t5_tokenizer", "t5_config_from_state", "vae_config_from_state"]

T5_REPO, T5_CACHE_NAME = "google/t5-v1_1-xxl", "google_t5-v1_1-xxl"
_T5_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------------- the parts


def _part_setting(config: TrainConfig, name: str) -> str | None:
    value = getattr(config, name)  # name: one of the part settings clip_l, t5xxl, ae
    return os.path.expanduser(str(value)) if value else None


def _transformer(state: dict, where: str, dtype, fp8: bool = False):
    """The transformer built from ``state`` in ``dtype``; ``fp8`` (``fp8_base``): its block linears stored in float8
    as they load (``models/flux/memory.py``), so no bf16 copy of them ever exists."""
    fix = "it is not a complete FLUX.1 transformer; give flux1-dev/flux1-schnell or a model derived from them"
    try:
        params = params_from_state_dict(state)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise load_error(SETTING, f"{where}: cannot read the transformer's sizes ({type(e).__name__}: {e}); {fix}")
    if not fp8:
        return build_module(lambda: FluxTransformer(params), state, SETTING, where, "transformer", fix, dtype)
    from sd_scripts.models.flux.memory import fp8_weight_keys, store_flux_weights_fp8
    from sd_scripts.models.fp8 import FP8_DTYPE

    in_fp8 = fp8_weight_keys(params)
    transformer = build_module(lambda: FluxTransformer(params), state, SETTING, where, "transformer", fix,
                               lambda key: FP8_DTYPE if key in in_fp8 else dtype)
    store_flux_weights_fp8(transformer.requires_grad_(False))
    return transformer


def clip_config_from_state(state: Mapping, tokenizer=None):
    """CLIP-L's ``CLIPTextConfig`` sized from its weights (quick_gelu, 64-wide heads)."""
    from transformers import CLIPTextConfig

    token = state["embeddings.token_embedding.weight"]
    hidden = int(token.shape[1])
    layers = len({int(m[1]) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))})
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return CLIPTextConfig(vocab_size=int(token.shape[0]), hidden_size=hidden,
                          intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=int(state["embeddings.position_embedding.weight"].shape[0]),
                          hidden_act="quick_gelu", projection_dim=hidden, layer_norm_eps=1e-5, **ids)


def _clip_l(state: dict, tokenizer, setting: str, where: str, dtype):
    from transformers import CLIPTextModel

    state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()
             if not k.endswith("position_ids") and not k.startswith("text_projection.")}
    if "embeddings.token_embedding.weight" not in state or "encoder.layers.0.mlp.fc1.weight" not in state:
        raise load_error(setting, f"{where} holds no CLIP-L text encoder (text_model.*); give clip_l.safetensors")
    config = clip_config_from_state(state, tokenizer)
    wrapped = hasattr(_meta(lambda: CLIPTextModel(_probe_clip_config())), "text_model")
    if wrapped:
        state = {"text_model." + k: v for k, v in state.items()}
    fix = "it is not FLUX.1's CLIP-L; give clip_l.safetensors"
    return build_module(lambda: CLIPTextModel(config), state, setting, where, "CLIP-L", fix, dtype)


def _probe_clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _meta(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def t5_config_from_state(state: Mapping):
    """T5 v1.1 encoder config sized from its weights (gated-GELU feed-forward when ``wi_0`` is there)."""
    from transformers import T5Config

    shared = state["shared.weight"]
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = int(bias.shape[1])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight" if gated else
               "encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    layers = len({int(m[1]) for k in state if (m := re.match(r"^encoder\.block\.(\d+)\.", k))})
    return T5Config(vocab_size=int(shared.shape[0]), d_model=int(shared.shape[1]),
                    d_kv=int(state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads,
                    d_ff=int(wi.shape[0]), num_layers=layers, num_heads=heads,
                    relative_attention_num_buckets=int(bias.shape[0]), feed_forward_proj="gated-gelu" if gated else "relu",
                    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


def _t5(state: dict, setting: str, where: str, dtype):
    from transformers import T5EncoderModel

    state = {k: v for k, v in state.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" not in state or "encoder.block.0.layer.0.SelfAttention.q.weight" not in state:
        raise load_error(setting, f"{where} holds no T5-XXL encoder (encoder.block.*, shared.weight); "
                                  "give t5xxl_fp16.safetensors")
    config = t5_config_from_state(state)
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    fix = "it is not FLUX.1's T5-XXL encoder; give t5xxl_fp16.safetensors"
    model = _meta(lambda: T5EncoderModel(config))
    expected = set(model.state_dict())
    if "encoder.embed_tokens.weight" in expected:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return build_module(lambda: T5EncoderModel(config), state, setting, where, "T5-XXL", fix, dtype)


def vae_config_from_state(state: Mapping) -> dict:
    """FLUX's ``ae`` as a diffusers ``AutoencoderKL`` config, sized from its (LDM-named) weights."""
    levels = sorted({int(m[1]) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    channels = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    per_level = len({int(m[1]) for k in state if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(levels),
            "up_block_types": ["UpDecoderBlock2D"] * len(levels), "block_out_channels": channels,
            "layers_per_block": per_level, "act_fn": "silu",
            "latent_channels": int(state["encoder.conv_out.weight"].shape[0]) // 2, "norm_num_groups": 32,
            "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False, "force_upcast": True}


def _ae(state: dict, setting: str, where: str, dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise load_error(setting, f"{where} holds no FLUX.1 autoencoder (encoder.*/decoder.*); give ae.safetensors")
    config = vae_config_from_state(state)
    if config["latent_channels"] != 16:
        raise load_error(setting, f"{where} is a {config['latent_channels']}-channel VAE; FLUX.1 needs its "
                                  "16-channel ae.safetensors")
    converted = convert_ldm_vae_checkpoint(state, config)
    fix = "it is not FLUX.1's ae; give ae.safetensors"
    return build_module(lambda: AutoencoderKL.from_config(config), converted, setting, where, "VAE", fix, dtype)


def _take(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix):]: checkpoint.pop(k) for k in [k for k in checkpoint if k.startswith(prefix)]}


_PART_PREFIXES = {"clip_l": (AIO_PREFIXES["clip_l"],), "t5xxl": (AIO_PREFIXES["t5xxl"],),
                  "ae": (AIO_PREFIXES["ae"], "first_stage_model.")}


def _read_part(path: str, setting: str, config: TrainConfig) -> dict:
    """A ``clip_l`` / ``t5xxl`` / ``ae`` file's weights: the file itself, or that part of an all-in-one file."""
    if not os.path.isfile(path):
        raise load_error(setting, f"{path} does not exist; give the {setting} .safetensors file")
    state, _ = read_checkpoint(path, setting, mmap=not config.disable_mmap_load_safetensors)
    for prefix in _PART_PREFIXES[setting]:
        if any(k.startswith(prefix) for k in state):
            return _take(state, prefix)
    return state


# ----------------------------------------------------------------------------------------------- tokenizers


def _t5_tokenizer_from(folder: Path, setting: str):
    from transformers import T5TokenizerFast

    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise load_error(setting, f"the T5 tokenizer in {folder} cannot be read ({type(e).__name__}); fix or remove it")
    if len(tokenizer) < 10 or tokenizer.eos_token_id is None:
        raise load_error(setting, f"{folder} holds no usable T5 tokenizer (tokenizer.json or spiece.model); fix it")
    return tokenizer


def _has_t5_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model"))


def load_t5_tokenizer(config: TrainConfig | None = None, model_folder: str | os.PathLike | None = None):
    """FLUX's T5 tokenizer, offline: the diffusers folder's ``tokenizer_2/``, ``tokenizer_cache_dir``
    (``<dir>/google_t5-v1_1-xxl`` or the folder itself), the Hugging Face cache; downloaded only when not offline."""
    if model_folder is not None and _has_t5_files(Path(model_folder) / "tokenizer_2"):
        return _t5_tokenizer_from(Path(model_folder) / "tokenizer_2", SETTING)
    cache_dir = config.tokenizer_cache_dir if config is not None else None
    if cache_dir:
        base = Path(os.path.expanduser(str(cache_dir)))
        for candidate in (base / T5_CACHE_NAME, base):
            if _has_t5_files(candidate):
                return _t5_tokenizer_from(candidate, "tokenizer_cache_dir")
    from huggingface_hub import snapshot_download

    for local_only in (True, False):
        if not local_only and offline():
            break
        try:
            folder = Path(snapshot_download(T5_REPO, allow_patterns=list(_T5_FILES), cache_dir=hf_cache_dir(),
                                            local_files_only=local_only))
        except Exception:  # noqa: BLE001 - not cached / no network
            continue
        if _has_t5_files(folder):
            tokenizer = _t5_tokenizer_from(folder, "tokenizer_cache_dir")
            if cache_dir and not local_only:
                try:
                    tokenizer.save_pretrained(str(Path(os.path.expanduser(str(cache_dir))) / T5_CACHE_NAME))
                except OSError:
                    pass
            return tokenizer
    raise ModelLoadError(f"tokenizer_cache_dir: no FLUX.1 T5 tokenizer found offline; set tokenizer_cache_dir to a "
                         f"folder holding the {T5_REPO} tokenizer (the folder itself or <dir>/{T5_CACHE_NAME})",
                         "tokenizer_cache_dir")


# ---------------------------------------------------------------------------------------------------- loading


def _fp8(config: TrainConfig) -> bool:
    """kohya's ``fp8_base`` / ``fp8_base_unet``: the transformer's block linears in float8."""
    return bool(config.fp8_base or config.fp8_base_unet)


def _placed(module, device):
    return module if module is None or device is None else module.to(device)


def _missing_part(setting: str, path: str) -> ModelLoadError:
    files = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"}
    return load_error(setting, f"{path} holds only the FLUX.1 transformer; set {setting} to {files[setting]}")


def load_flux(family, config: TrainConfig, info: dict, dtype, vae_dtype, device=None, clip_tokenizer=None) -> LoadedModel:
    """The FLUX.1 parts named by ``config`` (see the module doc), each cast to ``dtype`` (the VAE to ``vae_dtype``)
    as it is built and moved to ``device`` at once when given."""
    path = info["path"]
    mmap = not config.disable_mmap_load_safetensors
    if info["kind"] == "single_file":
        checkpoint, _ = read_checkpoint(path, SETTING, mmap=mmap)
        inside = {name: _take(checkpoint, prefix) for name, prefix in AIO_PREFIXES.items()}
        state = strip_bfl_prefix(checkpoint)
        del checkpoint
        transformer = _placed(_transformer(state, path, dtype, _fp8(config)), device)
        model_folder = None
    else:
        from safetensors.torch import load_file

        folder = Path(path)
        files = sorted((folder / "transformer").glob("*.safetensors"))
        if not files:
            raise load_error(SETTING, f"{folder}/transformer has no .safetensors weights; give a complete folder")
        state: dict = {}
        for file in files:
            state.update(load_file(str(file)))
        transformer = _placed(_transformer(diffusers_to_bfl(state), path, dtype, _fp8(config)), device)
        inside = {}
        model_folder = folder
    tokenizers = [clip_tokenizer, load_t5_tokenizer(config, model_folder)]

    def part(name: str, build, subfolder: str, part_dtype):
        setting_path = _part_setting(config, name)
        if setting_path:
            return build(_read_part(setting_path, name, config), name, setting_path, part_dtype)
        if inside.get(name):
            return build(inside.pop(name), SETTING, path, part_dtype)
        if model_folder is not None and (model_folder / subfolder).is_dir():
            return _from_diffusers(model_folder, subfolder, part_dtype)
        raise _missing_part(name, path)

    clip = _placed(part("clip_l", lambda s, st, w, d: _clip_l(s, tokenizers[0], st, w, d), "text_encoder", dtype),
                   device)
    t5 = _placed(part("t5xxl", _t5, "text_encoder_2", dtype), device)
    vae = _placed(part("ae", _ae, "vae", vae_dtype), device)
    for module in (transformer, clip, t5, vae):
        module.requires_grad_(False)
    return LoadedModel(family=family, unet=transformer, vae=vae, text_encoders=[clip, t5], tokenizers=tokenizers,
                       v_parameterization=False, model_path=path, info=info, options=family.training_options(config))


def _from_diffusers(folder: Path, subfolder: str, dtype):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    cls = {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel, "vae": AutoencoderKL}[subfolder]
    kwargs = {"torch_dtype": dtype} if subfolder == "vae" else {"dtype": dtype}
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True, **kwargs).eval()
    except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise load_error(SETTING, f"{folder}: the {subfolder} cannot be loaded ({first}); check the diffusers folder")
