"""Find out what a base model is (cheaply, for preflight) and load it: single-file LDM checkpoints or diffusers folders.

Single files (``.safetensors``; ``.ckpt``/``.pt`` pickles loaded with ``weights_only=True``) are converted with
diffusers' ``single_file_utils`` functions, offline, using either the model's own LDM config (``<stem>.yaml`` next
to it, as AUTOMATIC1111 reads it; an SGM config for SDXL) or the family's built-in full-size config. Text encoders
are built by us from their weights (size read from them, 64-wide attention heads); SD2's OpenCLIP encoder loses its
last block, as in kohya; SDXL's second encoder keeps all blocks and its projection (``CLIPTextModelWithProjection``).

Tokenizer lookup order: the diffusers folder's ``tokenizer/`` (``tokenizer_2/``); ``tokenizer_cache_dir`` (the folder
itself, or kohya's ``<dir>/openai_clip-vit-large-patch14`` / ``<dir>/stabilityai_stable-diffusion-2`` /
``<dir>/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k``); the Hugging Face cache (no network); a download (only when not
offline; saved into ``tokenizer_cache_dir`` when given). SDXL's second tokenizer always pads with "!" (id 0).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, ModelLoadError
from sd_scripts.models.families import FAMILIES, ModelFamily, get_family, requested_family
from sd_scripts.models.checkpoint_io import (  # noqa: F401 - re-exported: callers import them from here
    PICKLE_EXTS,
    SAFETENSORS_EXTS,
    SETTING,
    LoadedModel,
    _build_module,
    _fail,
    _hf_cache_dir,
    _is_safetensors,
    _offline,
    _read_safetensors_header,
    read_checkpoint,
    read_checkpoint_shapes,
)
from sd_scripts.models.tokenizers import _has_tokenizer_files, _hub_tokenizer_folder, load_tokenizer  # noqa: F401

__all__ = [
    "LoadedModel",
    "detect_family",
    "load_model",
    "load_tokenizer",
    "load_vae",
    "read_checkpoint",
    "read_checkpoint_shapes",
    "text_encoder_config_from_state",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CONFIG_FILES = ["model_index.json", "unet/config.json", "transformer/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]
_HUB_WEIGHT_FILES = ["unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                     "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                     "text_encoder_2/model-*.safetensors", "text_encoder_2/model.safetensors.index.json",
                     "transformer/diffusion_pytorch_model*.safetensors",
                     "transformer/diffusion_pytorch_model.safetensors.index.json"]  # FLUX.1 (sharded)


# ------------------------------------------------------------------------------------------------- file reading


def _read_yaml(path: Path, setting: str = SETTING) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["model"]["params"]  # noqa: B018 - shape check
    except Exception as e:  # noqa: BLE001 - any parse or shape problem
        raise _fail(setting, f"{path} (the LDM config next to the checkpoint) is not a valid model .yaml ({type(e).__name__}); "
                             "fix it or remove it to use the built-in config")
    return data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------------------------------------------- detection


def _resolve_hub_repo(repo_id: str, with_weights: bool) -> Path:
    """Local snapshot folder of a diffusers hub repo: the cache first, then a download unless offline."""
    from huggingface_hub import snapshot_download

    patterns = _HUB_CONFIG_FILES + (_HUB_WEIGHT_FILES if with_weights else [])
    kwargs = {"allow_patterns": patterns, "cache_dir": _hf_cache_dir()}
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if (folder / "model_index.json").is_file() and (not with_weights or (folder / "unet").is_dir()
                                                        or (folder / "transformer").is_dir()):
            return folder
    except Exception:  # noqa: BLE001 - not cached
        pass
    if _offline():
        raise _fail(SETTING, f"{repo_id!r} is not a file or folder here and is not in the Hugging Face cache "
                             "(offline); give a local .safetensors/.ckpt file or diffusers folder")
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - network/auth/not found
        raise _fail(SETTING, f"{repo_id!r} could not be downloaded ({type(e).__name__}); "
                             "check the name or give a local .safetensors/.ckpt file or diffusers folder")


def _model_location(config) -> tuple[str, str]:
    """``(kind, path)``: 'single_file' / 'diffusers' / 'hub'."""
    raw = config.pretrained_model_name_or_path
    if not raw:
        raise _fail(SETTING, "not set; give a .safetensors/.ckpt file or a diffusers folder")
    path = os.path.expanduser(str(raw))
    if os.path.isfile(path):
        return "single_file", os.path.realpath(path)
    if os.path.isdir(path):
        if (Path(path) / "model_index.json").is_file() or (Path(path) / "unet" / "config.json").is_file():
            return "diffusers", os.path.realpath(path)
        raise _fail(SETTING, f"{path} is a folder but not a diffusers model (no model_index.json or unet/config.json); "
                             "give a .safetensors/.ckpt file or a diffusers folder")
    looks_like_file = path.lower().endswith(SAFETENSORS_EXTS + PICKLE_EXTS + (".yaml", ".json"))
    if _REPO_ID.match(str(raw)) and not os.path.isabs(path) and not str(raw).startswith(".") and not looks_like_file:
        return "hub", str(raw)
    raise _fail(SETTING, f"{path} does not exist; give a .safetensors/.ckpt file or a diffusers folder")


def _unknown_family(path: str, shapes_or_configs: str) -> ModelLoadError:
    return _fail(SETTING, f"{path} is not a supported model family ({shapes_or_configs}); "
                          f"supported families: {', '.join(FAMILIES)} (set model_family if detection is wrong)")


def _family_of_single_file(path: str, shapes: dict) -> ModelFamily:
    own = [f for f in FAMILIES.values() if f.has_own_loader and f.claims_single_file(shapes)]
    if own:
        return own[0]
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise _fail(SETTING, f"{path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights; "
                             "is it a LoRA or a VAE?); give a full model")
    claimed = [f for f in FAMILIES.values() if not f.has_own_loader and f.claims_single_file(shapes)]
    if len(claimed) == 1:
        return claimed[0]
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise _unknown_family(path, "it looks like an SDXL refiner or another SGM model with one text encoder")
    if not claimed:
        raise _unknown_family(path, "unrecognised text encoder and UNet layout")
    return claimed[0]


def _family_of_diffusers(folder: Path) -> tuple[ModelFamily, dict, dict]:
    model_index = _read_json(folder / "model_index.json")
    unet_config = _read_json(folder / "unet" / "config.json")
    te_config = _read_json(folder / "text_encoder" / "config.json")
    own = [f for f in FAMILIES.values() if f.has_own_loader and f.claims_diffusers(unet_config, te_config, model_index)]
    if own:
        return own[0], unet_config, model_index
    if not unet_config:
        raise _fail(SETTING, f"{folder} has no readable unet/config.json; give a complete diffusers folder")
    claimed = [f for f in FAMILIES.values() if f.claims_diffusers(unet_config, te_config, model_index)]
    if len(claimed) != 1:
        kind = "an SDXL refiner" if model_index.get("requires_aesthetics_score") else \
            f"cross_attention_dim {unet_config.get('cross_attention_dim')}"
        raise _unknown_family(str(folder), kind)
    return claimed[0], unet_config, model_index


def _apply_family_settings(config: TrainConfig, detected: ModelFamily | None, where: str) -> ModelFamily:
    """The family the settings ask for, checked against the detected one.

    ``model_family`` forces a family; ``v2 = true`` means sd2 and ``sdxl = true`` sdxl (``false`` is kohya's default
    for both and claims nothing).
    """
    wanted = requested_family(config)
    setting = "sdxl" if config.sdxl else "v2" if config.v2 else "model_family"
    if detected is None:
        if wanted is None:
            raise _unknown_family(where, "could not tell from the file")
        return wanted
    if wanted is not None and wanted is not detected:
        raise ConfigError(f"{setting}: {where} is a {detected.name} model but the settings say {wanted.name}; "
                          f"unset {setting} to use the detected family", setting)
    return detected


def _v_from_single_file(shapes: dict, metadata: dict, yaml_config: dict | None,
                        family: ModelFamily | None = None) -> bool | None:
    if yaml_config is not None:
        if family is not None:
            return family.v_from_ldm_config(yaml_config)
        return yaml_config["model"]["params"].get("parameterization") == "v"
    if str(metadata.get("modelspec.prediction_type", "")).lower() == "v":
        return True
    if "v_pred" in shapes:
        return True
    return None


def detect_family(config) -> tuple[ModelFamily, dict]:
    """``(family, info)`` of ``config.pretrained_model_name_or_path`` without loading the weights.

    Reads a safetensors header, a sibling ``<stem>.yaml`` or a diffusers folder's configs (a ``.ckpt`` has to be
    unpickled). ``info``: ``kind`` ('single_file' | 'diffusers'), ``path``, ``format``, ``yaml`` (path or None),
    ``v_parameterization`` (resolved: the setting, else what the files say, else False), ``v_source``,
    ``trained_zero_terminal_snr`` (a ``ztsnr`` key, or ``rescale_betas_zero_snr`` in the scheduler config), ``family``
    and ``warnings`` (one-line notes for the user, e.g. an SD2 model whose prediction type cannot be told).
    Raises ModelLoadError / ConfigError with one line naming the setting.
    """
    kind, path = _model_location(config)
    info: dict = {"kind": kind, "path": path, "yaml": None}
    if kind == "hub":
        info["repo_id"] = path
        path = str(_resolve_hub_repo(path, with_weights=False))
        info.update(kind="diffusers", path=path)
    if info["kind"] == "single_file":
        shapes, metadata, _ = read_checkpoint_shapes(path)
        detected = _family_of_single_file(path, shapes)
        if detected.has_own_loader:
            return _own_loader_family(config, detected, info, shapes)
        yaml_path = Path(path).with_suffix(".yaml")
        yaml_config = _read_yaml(yaml_path) if yaml_path.is_file() else None
        info.update(format="safetensors" if _is_safetensors(path) else "ckpt",
                    yaml=str(yaml_path) if yaml_config is not None else None)
        file_v = _v_from_single_file(shapes, metadata, yaml_config, detected)
        info["trained_zero_terminal_snr"] = "ztsnr" in shapes  # NoobAI-XL v-pred marks itself so
    else:
        folder = Path(path)
        detected, _, _ = _family_of_diffusers(folder)
        if detected.has_own_loader:
            return _own_loader_family(config, detected, info, None)
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
        file_v = scheduler.get("prediction_type") == "v_prediction" if scheduler else None
        info["trained_zero_terminal_snr"] = bool(scheduler and scheduler.get("rescale_betas_zero_snr"))
        info["format"] = "diffusers"
    family = _apply_family_settings(config, detected, path)
    if config.v_parameterization is not None:
        info["v_parameterization"], info["v_source"] = bool(config.v_parameterization), "setting"
    elif file_v is not None:
        info["v_parameterization"], info["v_source"] = bool(file_v), "model files"
    else:
        info["v_parameterization"], info["v_source"] = False, "default"
    info["family"] = family.name
    info["warnings"] = []
    if info["v_source"] == "default" and family.v_resolution != family.default_resolution:
        info["warnings"].append(
            f"{SETTING}: cannot tell whether this {family.name} model predicts v (768-v models do); "
            "set v_parameterization true for a 768-v model, or put its .yaml next to it")
    return family, info


def _own_loader_family(config, detected: ModelFamily, info: dict, shapes: dict | None) -> tuple[ModelFamily, dict]:
    """Detection for a family that describes and loads its own files (FLUX.1)."""
    family = _apply_family_settings(config, detected, info["path"])
    info.update(family.describe(config, info, shapes))
    info["family"] = family.name
    info.setdefault("warnings", [])
    return family, info


# ------------------------------------------------------------------------------------------------- tokenizers


# ------------------------------------------------------------------------------------------- building modules


def _take(checkpoint: dict, prefix: str) -> dict:
    """Move the ``prefix`` keys out of ``checkpoint``: once a part is built, nothing holds its source tensors."""
    return {k: checkpoint.pop(k) for k in [k for k in checkpoint if k.startswith(prefix)]}


def _ldm_text_encoder_state(family: ModelFamily, checkpoint: dict, index: int = 0) -> dict:
    from sd_scripts.models.ldm_convert import clip_from_ldm, openclip_from_ldm

    spec = family.text_encoder_specs[index]
    if spec.kind == "clip":
        return clip_from_ldm(checkpoint, spec.ldm_prefix)
    if spec.kind == "openclip":
        return openclip_from_ldm(checkpoint, spec.ldm_prefix, drop_last_layer=spec.drop_last_layer,
                                 with_projection=spec.with_projection)
    raise ValueError(f"unknown text encoder kind {spec.kind!r}")


def text_encoder_config_from_state(family: ModelFamily, state: dict, tokenizer=None, index: int = 0):
    """A ``CLIPTextConfig`` sized from the weights (64-wide heads), with the activation of the family's encoder
    ``index``; ``projection_dim`` from ``text_projection.weight`` when the weights have one."""
    from transformers import CLIPTextConfig

    token = state["embeddings.token_embedding.weight"]
    hidden = int(token.shape[1])
    layers = len({int(m[1]) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))})
    kwargs = {}
    if tokenizer is not None:
        kwargs = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    return CLIPTextConfig(
        vocab_size=int(token.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=int(state["embeddings.position_embedding.weight"].shape[0]),
        hidden_act=family.text_encoder_specs[index].hidden_act,
        projection_dim=int(state["text_projection.weight"].shape[0]) if "text_projection.weight" in state else hidden,
        layer_norm_eps=1e-5,
        **kwargs,
    )


def _text_encoder_from_ldm(family: ModelFamily, checkpoint: dict, tokenizer, where: str, dtype, index: int = 0):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = family.text_encoder_specs[index]
    state = _ldm_text_encoder_state(family, _take(checkpoint, spec.ldm_prefix), index)
    what = "text encoder" if len(family.text_encoder_specs) == 1 else f"text encoder {index + 1}"
    if "embeddings.token_embedding.weight" not in state or "encoder.layers.0.mlp.fc1.weight" not in state:
        raise _fail(SETTING, f"{where} has no {family.name} {what} weights ({spec.ldm_prefix}*); "
                             "give a full model checkpoint")
    if spec.with_projection and "text_projection.weight" not in state:
        raise _fail(SETTING, f"{where} has no {spec.ldm_prefix}text_projection for the {family.name} {what}; "
                             "give a full model checkpoint")
    te_config = text_encoder_config_from_state(family, state, tokenizer, index)
    if spec.with_projection:
        cls, wrapped = CLIPTextModelWithProjection, True
    else:
        cls, wrapped = CLIPTextModel, _clip_has_text_model_wrapper()
    if wrapped:
        state = {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in state.items()}
    fix = "the checkpoint's text encoder is damaged or of another family"
    return _build_module(lambda: cls(te_config), state, SETTING, where, what, fix, dtype)


_WRAPPER: bool | None = None


def _clip_has_text_model_wrapper() -> bool:
    """True on transformers versions whose ``CLIPTextModel`` keeps ``.text_model`` (before 5.6)."""
    global _WRAPPER
    if _WRAPPER is None:
        from transformers import CLIPTextConfig, CLIPTextModel

        from accelerate import init_empty_weights

        with init_empty_weights():
            probe = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=1, max_position_embeddings=4,
                                                 bos_token_id=0, eos_token_id=1, pad_token_id=1))
        _WRAPPER = hasattr(probe, "text_model")
    return _WRAPPER


def _unet_from_ldm(checkpoint: dict, ldm_config: dict, where: str, fix: str, dtype, family: ModelFamily | None = None):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    family = family or get_family("sd1")
    try:
        unet_config = family.unet_config_from_ldm(ldm_config, checkpoint)
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(SETTING, f"{where}: its model config has no usable UNet description ({type(e).__name__}: {e}); {fix}")
    from sd_scripts.models.ldm_convert import LDM_UNET_PREFIX

    state = convert_ldm_unet_checkpoint(_take(checkpoint, LDM_UNET_PREFIX), unet_config)
    return _build_module(lambda: UNet2DConditionModel.from_config(unet_config), state, SETTING, where, "UNet", fix, dtype)


def _vae_from_ldm(checkpoint: dict, vae_config: dict, setting: str, where: str, fix: str, dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    return _build_module(lambda: AutoencoderKL.from_config(vae_config), state, setting, where, "VAE", fix, dtype)


def _placed(module, device):
    """``module`` moved to ``device`` at once (lowram: the next part is built while this one is already off the
    system RAM); unchanged without a device."""
    return module if module is None or device is None else module.to(device)


def _load_single_file(family: ModelFamily, info: dict, config, tokenizers: list, dtype, vae_dtype, device=None):
    """The parts of a single-file checkpoint; each part's tensors leave ``checkpoint`` as it is built, so the
    peak memory is about one copy of the weights (plus the largest part's cast), not the file plus the model."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    from sd_scripts.models.ldm_convert import LDM_VAE_PREFIX

    path = info["path"]
    # tensor by tensor into memory of their own (also what disable_mmap_load_safetensors asks for: sequential reads):
    # each part's source tensors are freed as it is cast, where a memory map would keep the whole file resident
    checkpoint, _ = read_checkpoint(path, streamed=True)
    v_param = info["v_parameterization"]
    if info.get("yaml"):
        ldm_config = _read_yaml(Path(info["yaml"]))
        fix = f"the checkpoint does not match {Path(info['yaml']).name}; fix or remove that .yaml"
    else:
        ldm_config = family.builtin_ldm_config(v_param)
        fix = (f"it is not a standard full-size {family.name} model; put its LDM config next to it as "
               f"{Path(path).with_suffix('.yaml').name}")
    unet = _placed(_unet_from_ldm(checkpoint, ldm_config, path, fix, dtype, family), device)
    text_encoders = [_placed(_text_encoder_from_ldm(family, checkpoint, tokenizer, path, dtype, i), device)
                     for i, tokenizer in enumerate(tokenizers)]
    has_vae = any(k.startswith("first_stage_model.") for k in checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(ldm_config, checkpoint)
    vae = None
    if has_vae:
        vae = _placed(_vae_from_ldm(_take(checkpoint, LDM_VAE_PREFIX), vae_config, SETTING, path, fix, vae_dtype),
                      device)
    elif not config.vae:
        raise _fail(SETTING, f"{path} has no VAE weights (first_stage_model.*); set vae to a VAE file or folder")
    return unet, vae, text_encoders, vae_config


def _load_diffusers(family: ModelFamily, folder: str, dtype, vae_dtype, device=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def load(what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise _fail(SETTING, f"{folder}: the {what} cannot be loaded ({first}); check the diffusers folder")

    unet = _placed(load("UNet", lambda: UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)), device)
    vae = None
    if (Path(folder) / "vae").is_dir():
        vae = _placed(load("VAE", lambda: AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, torch_dtype=vae_dtype)), device)
    text_encoders = []
    for spec in family.text_encoder_specs:
        cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
        what = "text encoder" if spec.subfolder == "text_encoder" else spec.subfolder.replace("_", " ")
        text_encoders.append(_placed(load(what, lambda cls=cls, sub=spec.subfolder: cls.from_pretrained(
            folder, subfolder=sub, local_files_only=True, dtype=dtype)).eval(), device))
    return unet.eval(), vae, text_encoders


# ----------------------------------------------------------------------------------------------------- the VAE


def _default_vae_config() -> dict:
    return get_family("sd1").diffusers_vae_config()


def load_vae(path: str, base_config: dict | None = None, dtype=None, setting: str = "vae"):
    """A VAE from a diffusers folder (with or without ``vae/``) or a ``.safetensors``/``.ckpt``/``.pt``/``.bin`` file.

    Files may hold an LDM VAE (``first_stage_model.`` prefix optional; a full model checkpoint works too) or diffusers
    VAE keys. ``base_config`` (the base model's diffusers VAE config) sizes a VAE read from a file; full-size SD by default.
    """
    import torch
    from diffusers import AutoencoderKL

    dtype = dtype or torch.float32
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        folder = Path(path)
        sub = "vae" if (folder / "vae" / "config.json").is_file() else None
        if sub is None and not (folder / "config.json").is_file():
            raise _fail(setting, f"{path} is not a diffusers VAE folder (no config.json or vae/config.json); "
                                 "give a VAE .safetensors/.ckpt/.pt file or a diffusers folder")
        try:
            kwargs = {"subfolder": sub} if sub else {}
            return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **kwargs).eval()
        except Exception as e:  # noqa: BLE001
            raise _fail(setting, f"{path}: the VAE cannot be loaded ({type(e).__name__}); check the folder")
    if not os.path.isfile(path):
        raise _fail(setting, f"{path} does not exist; give a VAE .safetensors/.ckpt/.pt file or a diffusers folder")
    state, _ = read_checkpoint(path, setting)
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    config = dict(base_config) if base_config else _default_vae_config()
    fix = "it is not a VAE for this model; give a matching VAE"
    if any(k.startswith("encoder.down_blocks.") for k in state):
        return _build_module(lambda: AutoencoderKL.from_config(config), state, setting, path, "VAE", fix, dtype)
    if not any(k.startswith("encoder.down.") for k in state):
        raise _fail(setting, f"{path} holds no VAE weights (encoder.*/decoder.*); give a VAE file or folder")
    return _vae_from_ldm(state, config, setting, path, fix, dtype)


# ---------------------------------------------------------------------------------------------------- loading


def load_model(config, dtype=None, vae_dtype=None, device=None) -> LoadedModel:
    """Load the base model named by ``config.pretrained_model_name_or_path`` (and ``config.vae``), offline.

    All parts come back on the CPU (or, each as soon as it is built, on ``device``: kohya's ``lowram``) in eval mode,
    floats as ``dtype`` (float32 by default), the VAE as ``vae_dtype`` (default ``dtype``). Loading straight into the
    training's half precision halves the memory the load needs.
    """
    import torch

    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    family, info = detect_family(config)
    if info["kind"] == "diffusers" and info.get("repo_id"):
        info["path"] = str(_resolve_hub_repo(info["repo_id"], with_weights=True))
    if family.has_own_loader:
        return family.load(config, info, dtype, vae_dtype, device)
    model_folder = info["path"] if info["kind"] == "diffusers" else None
    tokenizers = [load_tokenizer(family, config, model_folder, i) for i in range(len(family.text_encoder_specs))]
    if info["kind"] == "single_file":
        unet, vae, text_encoders, vae_config = _load_single_file(family, info, config, tokenizers, dtype, vae_dtype,
                                                                 device)
    else:
        unet, vae, text_encoders = _load_diffusers(family, info["path"], dtype, vae_dtype, device)
        vae_config = dict(vae.config) if vae is not None else None
    if config.vae:
        vae = _placed(load_vae(config.vae, dict(vae.config) if vae is not None else vae_config, vae_dtype), device)
    elif vae is None:
        raise _fail(SETTING, f"{info['path']} has no VAE; set vae to a VAE file or folder")
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    return LoadedModel(family=family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                       v_parameterization=bool(info["v_parameterization"]), model_path=info["path"], info=info)
