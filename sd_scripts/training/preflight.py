"""Preflight: every check that can run before a model is loaded, all problems reported together.

``preflight(config)`` returns a :class:`Plan` (the scanned dataset, the detected model family,
warnings, a short summary of the dataset and the disk space needed) or raises :class:`UserErrors`
listing every problem found, each one line naming the setting and the fix. Nothing is written and
the dataset is only read.

What is checked:

* settings alone (:func:`check_settings`): ranges, choices, combinations, paths that must exist,
  output folder and name, CUDA-only options on a machine without CUDA;
* optimizer and scheduler settings (``optimizers.check_optimizer_settings``);
* noise and loss settings (``loss_terms.check_noise_loss_settings``) and, once the model's prediction type is
  read, those that need epsilon or v prediction (``loss_terms.prediction_type_problems``);
* the base model (family detected from a safetensors header or a diffusers folder's configs) and,
  offline, whether its CLIP tokenizer can be found;
* the sample prompt file and sampler;
* the LoRA's metadata settings (``user_metadata.check_metadata_settings``: the thumbnail must be an image);
* the dataset (``dataset_layout.scan_dataset``): layout, captions, every image decoded once;
* free disk space (:func:`check_disk_space`) for the LoRA files and training states (estimated from the
  model's layer shapes and ``network_dim``), the on-disk latent and text-encoder caches, sample images and logs.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.config import is_finite_number as _number, is_whole_number as _is_int
from sd_scripts.core.errors import ConfigError, UserError, UserErrors

__all__ = ["Plan", "DiskNeed", "preflight", "check_settings", "check_disk_space", "estimate_lora_bytes",
           "dataset_summary"]

# Reserved device names on Windows: "con.safetensors" cannot be created there.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_NAME_CHARS = '/\\:*?"<>|'

# LoRA parameters per unit of rank (UNet attention/feed-forward + text encoder, no conv), used when
# the model's layer shapes cannot be read cheaply (a .bin diffusers folder, a hub id).
_PARAMS_PER_RANK = {"sd1": 600_000, "sd2": 700_000, "sdxl": 2_900_000}
_CONV_PARAMS_PER_RANK = {"sd1": 1_600_000, "sd2": 1_600_000, "sdxl": 4_000_000}
_LATENT_CHANNELS = 4
_PNG_BYTES_PER_PIXEL = 2.0  # generated sample images compress little: about 2 of the 3 bytes per RGB pixel
_LOG_BYTES_PER_STEP = 512  # TensorBoard scalars per step: losses and one lr per parameter group


@dataclass
class DiskNeed:
    """Bytes a run will write to one file system."""

    path: str  # the folder the bytes go to (first one seen on that file system)
    setting: str  # the setting that chose that folder
    bytes: int = 0
    parts: list[str] = field(default_factory=list)


@dataclass
class Plan:
    dataset: Any = None
    family: Any = None
    model_info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    disk: list[DiskNeed] = field(default_factory=list)
    steps: int | None = None  # optimizer steps the run will take, estimated from the image count (buckets aside)


# --------------------------------------------------------------------------------------------- settings


def check_settings(config) -> list[UserError]:
    """Value and combination checks on settings alone (reads no file contents)."""
    errors: list[UserError] = []

    def bad(setting: str, text: str) -> None:
        errors.append(ConfigError(f"{setting}: {text}", setting=setting))

    def at_least(name: str, minimum: float, optional: bool = True, what: str = "") -> None:
        value = getattr(config, name, None)
        if value is None:
            if not optional:
                bad(name, f"must be {minimum:g} or more, got nothing")
            return
        if not _number(value):
            bad(name, f"must be a number, got {value!r}")
        elif value < minimum:
            bad(name, f"must be {minimum:g} or more{what}, got {value:g}")

    # lengths and batches
    at_least("train_batch_size", 1, optional=False)
    at_least("gradient_accumulation_steps", 1, optional=False)
    if config.max_train_epochs is None:
        at_least("max_train_steps", 1, optional=False)
    else:
        at_least("max_train_epochs", 1)
    at_least("max_data_loader_n_workers", 0)
    # learning rates and optimization
    if config.learning_rate is None:
        bad("learning_rate", "not set; give a learning rate such as 1e-4")
    else:
        at_least("learning_rate", 0)
    for name in ("unet_lr", "max_grad_norm", "noise_offset", "prior_loss_weight",
                 "keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_step"):
        at_least(name, 0)
    if isinstance(config.text_encoder_lr, (list, tuple)):  # one per text encoder (kohya's nargs)
        if not config.text_encoder_lr or not all(_number(v) and v >= 0 for v in config.text_encoder_lr):
            bad("text_encoder_lr", "give one learning rate, or one per text encoder (two for SDXL), each 0 or more; "
                                   f"got {list(config.text_encoder_lr)}")
    else:
        at_least("text_encoder_lr", 0)
    if _number(config.lr_warmup_steps) and config.lr_warmup_steps < 0:
        bad("lr_warmup_steps", f"must be 0 or more, got {config.lr_warmup_steps:g}")
    if config.min_snr_gamma is not None and (not _number(config.min_snr_gamma) or config.min_snr_gamma <= 0):
        bad("min_snr_gamma", f"must be above 0 (leave it unset to turn it off), got {config.min_snr_gamma}")
    if config.multires_noise_iterations is not None:
        at_least("multires_noise_iterations", 1)
    if not _number(config.multires_noise_discount) or not 0 <= config.multires_noise_discount <= 1:
        bad("multires_noise_discount", f"must be between 0 and 1, got {config.multires_noise_discount}")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout"):
        value = getattr(config, name)
        if value is not None and (not _number(value) or not 0 <= value <= 1):
            bad(name, f"must be between 0 and 1, got {value}")
    # network
    if config.network_dim is not None and (not _is_int(config.network_dim) or config.network_dim < 1):
        bad("network_dim", f"must be a whole number of 1 or more, got {config.network_dim}")
    if config.network_alpha is not None and (not _number(config.network_alpha) or config.network_alpha < 0):
        bad("network_alpha", f"must be 0 or more (the LoRA is scaled by alpha / dim), got {config.network_alpha}")
    if config.network_train_unet_only and config.network_train_text_encoder_only:
        bad("network_train_unet_only", "cannot be combined with network_train_text_encoder_only; pick one")
    if config.dim_from_weights and not config.network_weights:
        bad("dim_from_weights", "needs network_weights (the LoRA file whose dim and alpha are used); set it or turn "
            "dim_from_weights off")
    _check_extras(config, bad)
    # precision and text encoder
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        bad("mixed_precision", f"{config.mixed_precision!r} is not one of no, fp16, bf16")
    if config.save_precision not in (None, "float", "fp32", "fp16", "bf16"):
        bad("save_precision", f"{config.save_precision!r} is not one of float, fp16, bf16")
    if config.save_model_as not in ("safetensors", "ckpt", "pt"):
        bad("save_model_as", f"{config.save_model_as!r} is not one of safetensors, ckpt, pt")
    if config.max_token_length not in (None, 75, 150, 225):
        bad("max_token_length", f"must be 75, 150 or 225, got {config.max_token_length}")
    if config.clip_skip is not None and (not _is_int(config.clip_skip) or not 1 <= config.clip_skip <= 12):
        bad("clip_skip", f"must be between 1 and 12, got {config.clip_skip}")
    if config.full_fp16 and config.mixed_precision != "fp16":
        bad("full_fp16", "needs mixed_precision fp16")
    if config.full_bf16 and config.mixed_precision != "bf16":
        bad("full_bf16", "needs mixed_precision bf16")
    if config.full_fp16 and config.full_bf16:
        bad("full_fp16", "cannot be combined with full_bf16; pick one")
    for name in ("fp8_base", "fp8_base_unet"):
        if getattr(config, name) and config.mixed_precision not in ("fp16", "bf16"):
            bad(name, "needs mixed_precision fp16 or bf16 (float8 weights are computed in the mixed precision)")
    if config.log_with is not None and config.log_with not in ("tensorboard", "wandb", "all"):
        bad("log_with", f"{config.log_with!r} is not one of tensorboard, wandb, all")
    elif config.log_with:
        import importlib.util

        needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[config.log_with]
        for package in needed:
            if importlib.util.find_spec(package) is None:
                bad("log_with", f"{config.log_with} needs the {package} package, which is not installed; "
                    f"install it (pip install {package}) or leave log_with unset")
    # saving and sampling
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                 "save_last_n_epochs_state", "sample_every_n_steps", "sample_every_n_epochs", "save_n_epoch_ratio"):
        value = getattr(config, name)
        if value is not None and (not _number(value) or value < 1):
            bad(name, f"must be 1 or more when given, got {value}")
    sampling = bool(config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first)
    if sampling and not config.sample_prompts:
        bad("sample_prompts", "sampling is on (sample_every_n_*/sample_at_first) but no prompt file is given; "
            "set sample_prompts")
    if (sampling or config.sample_prompts) and config.sample_sampler:
        from sd_scripts.training.sampling import SAMPLERS

        if str(config.sample_sampler).lower() not in SAMPLERS:
            bad("sample_sampler", f"unknown sampler {config.sample_sampler!r}; choose one of {', '.join(SAMPLERS)}")
    from sd_scripts.training.validation import check_validation_settings

    errors.extend(check_validation_settings(config))
    # output
    _check_output(config, bad)
    # CUDA-only options
    if config.mixed_precision == "fp16" and not _cuda_available():
        bad("mixed_precision", "fp16 needs a CUDA GPU; use no (or bf16) on this machine")
    if config.xformers and not _cuda_available():
        bad("xformers", "xformers needs a CUDA GPU; turn it off (SDPA attention is used by default)")
    elif config.xformers:
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            bad("xformers", "the xformers package is not installed; install it or turn xformers off (SDPA attention "
                "is used by default)")
    # input paths
    for name, kind in (("network_weights", "file"), ("vae", "any"), ("dataset_config", "file"),
                       ("sample_prompts", "file")):
        value = getattr(config, name)
        if not value:
            continue
        if not os.path.exists(value):
            bad(name, f"not found: {value}; check the path")
        elif kind == "file" and not os.path.isfile(value):
            bad(name, f"{value} is a folder; give the file")
        elif not os.access(value, os.R_OK):
            bad(name, f"{value} cannot be read (permission denied); check its permissions")
    if config.resume and not os.path.isdir(config.resume):
        bad("resume", f"state folder not found: {config.resume}; give a folder saved with save_state")
    if config.logging_dir and os.path.exists(config.logging_dir) and not os.path.isdir(config.logging_dir):
        bad("logging_dir", f"{config.logging_dir} is a file, not a folder; give a folder for the logs")
    return errors


# LyCORIS algorithms whose modules have no max-norm of their own (lycoris-lora 4.1.3)
_NO_MAX_NORM_ALGOS = ("full", "ia3", "dylora", "glora")


def _check_extras(config, bad) -> None:
    """scale_weight_norms, initial_step/initial_epoch/skip_until_initial_step (base_weights files: preflight)."""
    swn = getattr(config, "scale_weight_norms", None)
    if swn is not None and (not _number(swn) or swn < 0):
        bad("scale_weight_norms", f"must be a limit above 0 (1 is a good start), or 0/unset for off; got {swn}")
    elif swn:
        from sd_scripts.networks.factory import network_kind
        from sd_scripts.networks.network_args import split_network_args

        try:
            lycoris = network_kind(config.network_module) == "lycoris"
            algo = str(split_network_args(config.network_args).get("algo", "lora")).strip().lower()
        except UserError:
            lycoris = False  # reported by the network checks
        if lycoris and algo in _NO_MAX_NORM_ALGOS:
            bad("scale_weight_norms", f"LyCORIS algo={algo} has no max-norm regularization (LoCon, LoHa, LoKr and "
                "OFT have); turn scale_weight_norms off or change algo")
    initial_step = getattr(config, "initial_step", None)
    initial_epoch = getattr(config, "initial_epoch", None)
    if initial_step is not None and (not _is_int(initial_step) or initial_step < 0):
        bad("initial_step", f"must be a whole number of 0 or more (0 = the first step), got {initial_step}")
    elif initial_step is not None and config.max_train_epochs is None and _is_int(config.max_train_steps) \
            and initial_step >= config.max_train_steps:
        bad("initial_step", f"{initial_step} is not below max_train_steps {config.max_train_steps}; raise "
            "max_train_steps or start earlier")
    if initial_epoch is not None and (not _is_int(initial_epoch) or initial_epoch < 1):
        bad("initial_epoch", f"must be a whole number of 1 or more (1 = the first epoch), got {initial_epoch}")
    elif initial_epoch is not None and initial_step is None and _is_int(config.max_train_epochs) \
            and initial_epoch > config.max_train_epochs:
        bad("initial_epoch", f"{initial_epoch} is after the last epoch ({config.max_train_epochs}); raise "
            "max_train_epochs or start earlier")
    if config.resume and (initial_step is not None or initial_epoch is not None):
        which = "initial_step" if initial_step is not None else "initial_epoch"
        bad(which, "cannot be combined with resume (the state holds the step to continue from); remove one")


def _check_output(config, bad) -> None:
    out = config.output_dir
    if not out:
        bad("output_dir", "not set; give the folder where the LoRA should be saved")
    elif os.path.exists(out) and not os.path.isdir(out):
        bad("output_dir", f"{out} is a file, not a folder; give a folder (it is created if missing)")
    else:
        parent = _existing_ancestor(out)
        if parent is None or not os.path.isdir(parent):
            bad("output_dir", f"{out} cannot be created: {parent or 'its parent'} is not a folder")
        elif not os.access(parent, os.W_OK | os.X_OK):
            bad("output_dir", f"{out} cannot be written ({parent} is read-only for this user); choose another folder")
    name = config.output_name
    if name is not None:
        if not str(name).strip():
            bad("output_name", "is empty; give a file name without extension, e.g. my_lora")
        elif any(c in name for c in _BAD_NAME_CHARS) or any(ord(c) < 32 for c in name):
            bad("output_name", f"{name!r} contains characters not allowed in file names ({_BAD_NAME_CHARS}); "
                "use letters, digits, - and _")
        elif name.rstrip(" .") != name:
            bad("output_name", f"{name!r} ends with a space or a dot, which Windows cannot keep; remove it")
        elif name.split(".")[0].lower() in _WINDOWS_RESERVED:
            bad("output_name", f"{name!r} is a reserved device name on Windows; choose another name")
        elif len(name.encode("utf-8")) > 200:
            bad("output_name", f"is {len(name.encode('utf-8'))} bytes long; use a name of at most 200 bytes")


def _existing_ancestor(path: str) -> str | None:
    """``path`` itself or its nearest existing parent folder."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return current


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


# ------------------------------------------------------------------------------------------ tokenizer


def _check_tokenizer_offline(config, family, info: dict) -> UserError | None:
    """Offline, a missing CLIP tokenizer is known before any weight loads (online it is downloaded later)."""
    from pathlib import Path

    from sd_scripts.models import loading as ml

    if not ml._offline():
        return None
    cache_dir = getattr(config, "tokenizer_cache_dir", None)
    for index, source in enumerate(getattr(family, "tokenizer_sources", None) or []):
        if info.get("kind") == "diffusers":
            sub = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            if ml._has_tokenizer_files(Path(info["path"]) / sub):
                continue
        if cache_dir:
            base = Path(os.path.expanduser(str(cache_dir)))
            if any(ml._has_tokenizer_files(c) for c in (base, base / source.cache_name, base / source.cache_name / "tokenizer")):
                continue
        try:
            found = ml._hub_tokenizer_folder(source, local_only=True)
        except Exception:  # noqa: BLE001 - not in the cache
            found = None
        if found is not None:
            continue
        return ConfigError(
            f"tokenizer_cache_dir: no {family.name} CLIP tokenizer found offline; set tokenizer_cache_dir to a folder "
            f"holding the {source.repo_id} tokenizer (the folder itself or <dir>/{source.cache_name})",
            "tokenizer_cache_dir",
        )
    return None


# ------------------------------------------------------------------------------------- weight files


def _check_weight_files(config) -> list[UserError]:
    """network_weights must be a kohya LoRA and vae a VAE; read from safetensors headers (cheap)."""
    from pathlib import Path

    from sd_scripts.models.loading import _read_safetensors_header

    errors: list[UserError] = []
    weights = config.network_weights
    if weights and os.path.isfile(weights):
        from sd_scripts.files.lora_file import _read_header, load_lora_file

        try:
            header, _ = _read_header(Path(weights))
        except (OSError, ValueError, UnicodeDecodeError):
            header = None
        if header is not None:
            if not any(k.startswith(("lora_unet_", "lora_te")) for k in header if k != "__metadata__"):
                errors.append(ConfigError(
                    f"network_weights: {weights} has no lora_unet_/lora_te_ keys, so it is not a kohya LoRA file "
                    "(a full model or a diffusers-format LoRA?); give a LoRA file to continue from", "network_weights"))
        else:  # a .ckpt/.pt LoRA (small): loaded with weights_only
            try:
                load_lora_file(weights)
            except UserError as e:
                errors.append(e)
    vae = config.vae
    if vae and os.path.isdir(vae):
        if not (os.path.isfile(os.path.join(vae, "config.json")) or os.path.isfile(os.path.join(vae, "vae", "config.json"))):
            errors.append(ConfigError(f"vae: {vae} is not a diffusers VAE folder (no config.json or vae/config.json); "
                                      "give a VAE .safetensors/.ckpt/.pt file or a diffusers folder", "vae"))
    elif vae and os.path.isfile(vae) and vae.lower().endswith(".safetensors"):
        try:
            shapes, _ = _read_safetensors_header(vae, "vae")
        except UserError as e:
            errors.append(e)
        else:
            keys = [k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k for k in shapes]
            if not any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys):
                errors.append(ConfigError(f"vae: {vae} holds no VAE weights (encoder.*/decoder.*); give a VAE file "
                                          "or folder", "vae"))
    return errors


# ------------------------------------------------------------------------------------------ disk space


def _header_shapes(path: str) -> dict | None:
    from sd_scripts.models.loading import _read_safetensors_header

    try:
        shapes, _ = _read_safetensors_header(path, "pretrained_model_name_or_path")
    except UserError:
        return None
    return shapes


def _lora_params_from_shapes(shapes: dict, linear_rank: int, conv_rank: int | None, unet: bool, te: bool,
                             ldm: bool) -> int:
    """LoRA parameter count of kohya's targets in a checkpoint whose keys/shapes are ``shapes``."""
    import re

    from sd_scripts.networks.ldm_lora_map import _TE_TARGET, _UNET_TARGET, build_lora_map

    total = 0

    def module_params(shape: tuple, rank: int) -> int:
        if len(shape) == 2:
            return rank * (shape[0] + shape[1])
        if len(shape) == 4:
            return rank * (shape[1] * shape[2] * shape[3] + shape[0])
        return 0

    def wanted(shape: tuple, name: str = "", conv_only: bool | None = None) -> int | None:
        # kohya: ResnetBlock2D / Down- and Upsample2D layers are trained only with conv_dim (LoCon)
        if conv_only is None:
            conv_only = "resnets" in name or "samplers" in name
        if conv_only and not conv_rank:
            return None
        if len(shape) == 4 and (shape[2] > 1 or shape[3] > 1):
            return conv_rank
        return linear_rank

    if ldm:
        for name, target in build_lora_map(shapes).items():
            if not target.lora_target or (target.part == "unet" and not unet) or (target.part == "te" and not te):
                continue
            shape = tuple(shapes[target.weight_key])
            if target.rows is not None:
                shape = (target.rows[1] - target.rows[0], *shape[1:])
            rank = wanted(shape, name, getattr(target, "conv_only", None))
            if rank:
                total += module_params(shape, rank)
        return total
    te_key = re.compile(r"^(text_model\.)?")
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        is_unet = bool(_UNET_TARGET.search(path))
        is_te = bool(_TE_TARGET.search(te_key.sub("", path)))
        if (is_unet and unet) or (is_te and te):
            rank = wanted(tuple(shape), path)
            if rank:
                total += module_params(tuple(shape), rank)
    return total


def _network_ranks(config) -> tuple[int, int | None]:
    dim = config.network_dim if _is_int(config.network_dim) and config.network_dim > 0 else 4
    conv = None
    for item in config.network_args or []:
        key, _, value = str(item).partition("=")
        if key.strip() == "conv_dim":
            try:
                conv = int(float(value))
            except ValueError:
                conv = None
    if conv is None and str(getattr(config, "network_module", "")).startswith("lycoris"):
        conv = dim  # LyCORIS trains the convs by default (with conv_dim = dim unless set)
    return dim, conv


def estimate_lora_bytes(config, family=None, model_info: dict | None = None) -> int:
    """Roughly how big one saved LoRA file will be, from ``network_dim`` (and ``conv_dim``) and the
    model's layer shapes (read from safetensors headers), else from per-family averages."""
    dim, conv = _network_ranks(config)
    unet = not config.network_train_text_encoder_only
    te = not config.network_train_unet_only
    info = model_info or {}
    params = None
    try:
        if info.get("kind") == "single_file" and info.get("format") == "safetensors":
            shapes = _header_shapes(info["path"])
            if shapes:
                params = _lora_params_from_shapes(shapes, dim, conv, unet, te, ldm=True)
        elif info.get("kind") == "diffusers":
            total, found = 0, False
            for sub, part in (("unet", "unet"), ("text_encoder", "te"), ("text_encoder_2", "te")):
                folder = os.path.join(info["path"], sub)
                if not os.path.isdir(folder):
                    continue
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
                for f in files:
                    shapes = _header_shapes(os.path.join(folder, f))
                    if shapes:
                        found = True
                        total += _lora_params_from_shapes(shapes, dim, conv, unet and part == "unet",
                                                          te and part == "te", ldm=False)
                    break  # one file per component (a variant is a copy)
            params = total if found else None
    except Exception:  # noqa: BLE001 - an estimate must never stop a run
        params = None
    if not params:  # unreadable shapes, or key names this estimate does not know
        name = getattr(family, "name", "sd1")
        share = (0.75 if unet else 0.0) + (0.25 if te else 0.0)
        params = int(_PARAMS_PER_RANK.get(name, 600_000) * dim * share)
        if conv and unet:
            params += _CONV_PARAMS_PER_RANK.get(name, 1_600_000) * conv
    element = 4 if config.save_precision in (None, "float", "fp32") else 2
    return int(params * element) + 64 * 1024  # + header and metadata


def _steps_and_epochs(config, dataset) -> tuple[int, int]:
    images = (getattr(dataset, "num_train_images", 0) or 0) + (getattr(dataset, "num_reg_images", 0) or 0)
    batch = config.train_batch_size if _is_int(config.train_batch_size) and config.train_batch_size > 0 else 1
    accumulate = config.gradient_accumulation_steps if _is_int(config.gradient_accumulation_steps) and \
        config.gradient_accumulation_steps > 0 else 1
    per_epoch = max(1, math.ceil(max(images, 1) / batch / accumulate))
    if _is_int(config.max_train_epochs) and config.max_train_epochs > 0:
        return config.max_train_epochs * per_epoch, config.max_train_epochs
    steps = config.max_train_steps if _is_int(config.max_train_steps) and config.max_train_steps > 0 else 1
    return steps, max(1, math.ceil(steps / per_epoch))


def _count_saves(config, steps: int, epochs: int) -> tuple[int, int]:
    """(LoRA files, training states) kept at the end of the run, at most."""
    every_epochs = config.save_every_n_epochs
    if config.save_n_epoch_ratio and not every_epochs:
        every_epochs = max(1, epochs // config.save_n_epoch_ratio)
    epoch_saves = epochs // every_epochs if _is_int(every_epochs) and every_epochs > 0 else 0
    step_saves = steps // config.save_every_n_steps if _is_int(config.save_every_n_steps) and \
        config.save_every_n_steps > 0 else 0
    loras_epoch = min(epoch_saves, config.save_last_n_epochs) if config.save_last_n_epochs else epoch_saves
    loras_step = step_saves
    if config.save_last_n_steps and _is_int(config.save_every_n_steps) and config.save_every_n_steps > 0:
        loras_step = min(step_saves, config.save_last_n_steps // config.save_every_n_steps + 1)
    states = 0
    if config.save_state:
        state_epochs = min(epoch_saves, config.save_last_n_epochs_state) if config.save_last_n_epochs_state else \
            loras_epoch
        states = 1 + state_epochs + loras_step
    return 1 + loras_epoch + loras_step, states


def _latent_cache_bytes(config, dataset) -> int:
    from sd_scripts.data.dataset_layout import parse_resolution

    try:
        width, height = parse_resolution(config.resolution)
    except UserError:
        width = height = 512
    records = getattr(dataset, "images", []) or []
    images = len(records)
    per_image = _LATENT_CHANNELS * (width // 8) * (height // 8) * 4  # float32, bucket area ~ resolution area
    copies = 2 if config.flip_aug else 1
    subsets = getattr(dataset, "subsets", []) or []
    masked = sum(1 for r in records if getattr(r, "subset", None) is not None and r.subset < len(subsets)
                 and getattr(subsets[r.subset], "alpha_mask", False))
    return images * (per_image * copies + 2048) + masked * width * height * 4  # alpha masks: float32 at image size


def _sample_bytes(config, steps: int, epochs: int) -> int:
    """Sample images (and one grid per sampling point) written to ``<output_dir>/sample`` over the run."""
    events = 0
    if _is_int(config.sample_every_n_epochs) and config.sample_every_n_epochs > 0:
        events = epochs // config.sample_every_n_epochs
    elif _is_int(config.sample_every_n_steps) and config.sample_every_n_steps > 0:
        events = steps // config.sample_every_n_steps
    events += 1 if config.sample_at_first else 0
    if not events or not config.sample_prompts or not os.path.isfile(config.sample_prompts):
        return 0
    from sd_scripts.training.sampling import load_sample_prompts

    try:
        prompts = [p.normalise() for p in load_sample_prompts(config.sample_prompts)]
    except Exception:  # noqa: BLE001 - a bad prompt file is reported by preflight; an estimate never stops a run
        return 0
    pixels = sum(p.width * p.height for p in prompts)
    if len(prompts) > 1:
        pixels *= 2  # the grid holds every image again
    return int(events * pixels * _PNG_BYTES_PER_PIXEL)


def _te_cache_bytes(config, family, dataset) -> int:
    """Text-encoder outputs on disk: float32 hidden states (and a pooled vector) per caption, one caption per image
    at most."""
    tokens = config.max_token_length + 2 if _is_int(config.max_token_length) else 77
    per_caption = tokens * getattr(family, "context_dim", 768) * 4 + 1280 * 4 + 1024
    return len(getattr(dataset, "images", []) or []) * per_caption


def _folder_bytes(folder: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(config, plan: Plan) -> tuple[list[UserError], list[str], list[DiskNeed]]:
    """(errors, warnings, needs): free space for the LoRA files, states, latent and text-encoder caches, sample
    images and logs.

    An error names the setting whose folder is on the full disk when the free space is below the
    estimate; a warning when it is below twice the estimate. Uses ``shutil.disk_usage`` (tests
    monkeypatch it).
    """
    if not config.output_dir or (os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir)):
        return [], [], []
    lora = estimate_lora_bytes(config, plan.family, plan.model_info)
    steps, epochs = _steps_and_epochs(config, plan.dataset)
    n_loras, n_states = _count_saves(config, steps, epochs)
    needs: dict[Any, DiskNeed] = {}

    def add(folder: str, setting: str, amount: int, part: str) -> None:
        if amount <= 0:
            return
        anchor = _existing_ancestor(folder)
        if anchor is None:
            return
        try:
            device = os.stat(anchor).st_dev
        except OSError:
            return
        need = needs.setdefault(device, DiskNeed(path=anchor, setting=setting))
        need.bytes += amount
        need.parts.append(part)

    add(config.output_dir, "output_dir", lora * n_loras,
        f"{n_loras} LoRA files of about {_human(lora)}" if n_loras > 1 else f"a LoRA file of about {_human(lora)}")
    if n_states:
        # network weights in float32 plus optimizer state (two moments for Adam-like optimizers)
        state = (lora if config.save_precision in (None, "float", "fp32") else lora * 2) * 3
        add(config.output_dir, "output_dir", state * n_states, f"{n_states} training state(s) of about {_human(state)}")
    if config.cache_latents_to_disk and plan.dataset is not None:
        from sd_scripts.data.latent_cache import resolve_cache_dir

        try:
            cache_dir = resolve_cache_dir(config, plan.dataset)
        except UserError:
            cache_dir = None
        if cache_dir:
            setting = "latent_cache_dir" if getattr(config, "latent_cache_dir", None) else "output_dir"
            amount = _latent_cache_bytes(config, plan.dataset)
            if os.path.isdir(cache_dir):
                amount -= _folder_bytes(cache_dir)  # a previous run's cache is mostly reused
            add(cache_dir, setting, amount, f"a latent cache of about {_human(max(amount, 0))}")
    samples = _sample_bytes(config, steps, epochs)
    add(os.path.join(config.output_dir, "sample"), "output_dir", samples, f"sample images of about {_human(samples)}")
    if getattr(config, "cache_text_encoder_outputs_to_disk", False) and plan.dataset is not None:
        from sd_scripts.data.te_cache import resolve_te_cache_dir

        try:
            te_dir = resolve_te_cache_dir(config, plan.dataset)
        except UserError:
            te_dir = None
        if te_dir:
            amount = _te_cache_bytes(config, plan.family, plan.dataset)
            if os.path.isdir(te_dir):
                amount -= _folder_bytes(te_dir)
            add(te_dir, "output_dir", amount, f"a text-encoder cache of about {_human(max(amount, 0))}")
    if config.logging_dir:
        logs = steps * _LOG_BYTES_PER_STEP
        add(config.logging_dir, "logging_dir", logs, f"training logs of about {_human(logs)}")
    errors: list[UserError] = []
    warnings: list[str] = []
    for need in needs.values():
        try:
            free = shutil.disk_usage(need.path).free
        except OSError:
            continue
        what = ", ".join(need.parts)
        if free < need.bytes:
            errors.append(ConfigError(
                f"{need.setting}: not enough free disk space in {need.path}: {_human(free)} free, this run needs "
                f"about {_human(need.bytes)} ({what}); free some space or choose an {need.setting} on another disk",
                need.setting))
        elif free < 2 * need.bytes:
            warnings.append(f"{need.setting}: disk space is short in {need.path}: {_human(free)} free, this run "
                            f"needs about {_human(need.bytes)} ({what})")
    return errors, warnings, list(needs.values())


# --------------------------------------------------------------------------------------------- summary


def dataset_summary(dataset) -> list[str]:
    """One or two lines describing the scanned dataset, counting images without a caption file."""
    images = list(getattr(dataset, "images", []) or [])
    if not images:
        return []
    train = [r for r in images if not r.is_reg]
    reg = [r for r in images if r.is_reg]
    folders = len({(r.dataset, r.subset) for r in train})
    line = (f"dataset: {len(train)} training image(s) in {folders} folder(s), "
            f"{getattr(dataset, 'num_train_images', len(train))} with repeats")
    if reg:
        line += f"; {len(reg)} regularization image(s)"
    no_caption = [r for r in train if r.caption_source not in ("file", "metadata")]
    if no_caption:
        tokens = sum(1 for r in no_caption if r.caption_source == "class_tokens")
        kind = "a caption" if any(r.caption_source == "metadata" for r in train) else "a caption file"
        line += f"; {len(no_caption)} without {kind}"
        if tokens:
            line += f" ({tokens} use their folder's class tokens)"
    held_out = getattr(dataset, "validation_images", []) or []
    if held_out:
        line += f"; {len(held_out)} held out for the validation loss"
    skipped = getattr(dataset, "skipped", []) or []
    if skipped:
        line += f"; {len(skipped)} skipped"
    return [line]


# ------------------------------------------------------------------------------------------- preflight


def _collect(errors: list[UserError], exc: UserError) -> None:
    if isinstance(exc, UserErrors):
        errors.extend(exc.errors)
    else:
        errors.append(exc)


def preflight(config, model_given: bool = False) -> Plan:
    """Check everything that can be checked before the model loads; raise UserErrors on any problem."""
    from sd_scripts.data.dataset_layout import scan_dataset
    from sd_scripts.training.losses import check_noise_loss_settings, prediction_type_problems
    from sd_scripts.models.families import check_family_settings
    from sd_scripts.models.loading import detect_family
    from sd_scripts.training.optimizers import check_optimizer_settings
    from sd_scripts.files.user_metadata import check_metadata_settings
    from sd_scripts.networks.factory import check_network_settings

    errors = check_settings(config)
    plan = Plan()
    noise_errors, noise_warnings = check_noise_loss_settings(config)
    errors.extend(noise_errors)
    plan.warnings.extend(noise_warnings)
    metadata_errors, metadata_warnings = check_metadata_settings(config)
    errors.extend(metadata_errors)
    plan.warnings.extend(metadata_warnings)
    try:
        plan.warnings.extend(check_optimizer_settings(config) or [])
    except UserError as e:
        _collect(errors, e)
    if model_given:
        pass
    elif not config.pretrained_model_name_or_path:
        errors.append(ConfigError("pretrained_model_name_or_path: not set; give a .safetensors/.ckpt file or a "
                                  "diffusers folder", "pretrained_model_name_or_path"))
    else:
        try:
            plan.family, plan.model_info = detect_family(config)
            plan.warnings.extend(plan.model_info.get("warnings") or [])
            problem = _check_tokenizer_offline(config, plan.family, plan.model_info)
            if problem is not None:
                errors.append(problem)
            if "v_parameterization" in plan.model_info:  # else the loop checks them once the model is loaded
                v_errors, v_warnings = prediction_type_problems(config, bool(plan.model_info["v_parameterization"]))
                errors.extend(v_errors)
                plan.warnings.extend(v_warnings)
            if plan.model_info.get("trained_zero_terminal_snr") and not config.zero_terminal_snr:
                plan.warnings.append("zero_terminal_snr: the model was trained with zero terminal SNR (its files "
                                     "say so); turn zero_terminal_snr on to train on the same noise schedule")
        except UserError as e:
            _collect(errors, e)
    errors.extend(_check_weight_files(config))
    if config.base_weights or config.base_weights_multiplier:
        from sd_scripts.networks.base_weights import check_base_weights

        errors.extend(check_base_weights(config, plan.family))
    if config.sample_prompts and os.path.isfile(config.sample_prompts):
        from sd_scripts.training.sampling import load_sample_prompts

        try:
            prompts = load_sample_prompts(config.sample_prompts)
            if not prompts:
                errors.append(ConfigError(f"sample_prompts: {config.sample_prompts} holds no prompt; write one "
                                          "prompt per line", "sample_prompts"))
        except UserError as e:
            _collect(errors, e)
        except (ValueError, TypeError, AttributeError) as e:  # a JSON prompt file of the wrong shape
            errors.append(ConfigError(f"sample_prompts: {config.sample_prompts} is not a list of prompts "
                                      f"({type(e).__name__}); write one prompt per line", "sample_prompts"))
    try:
        plan.dataset = scan_dataset(config)
        plan.warnings.extend(getattr(plan.dataset, "warnings", []) or [])
        plan.summary.extend(dataset_summary(plan.dataset))
    except UserError as e:
        _collect(errors, e)
    family_errors, family_warnings = check_family_settings(config, plan.family, plan.dataset, plan.model_info)
    errors.extend(family_errors)
    plan.warnings.extend(family_warnings)
    try:
        plan.warnings.extend(check_network_settings(config, plan.family))
    except UserError as e:
        _collect(errors, e)
    if plan.dataset is not None and config.output_dir:
        problem = _output_inside_dataset(config.output_dir, plan.dataset)
        if problem is not None:
            errors.append(problem)
    from sd_scripts.training.sampling import check_sampling_settings
    from sd_scripts.training.loop_settings import check_loop_settings
    from sd_scripts.training.state import check_resume_settings

    # resume state, sampler packages and logging: checked here so every front end reports them with the rest
    errors.extend(check_resume_settings(config) + check_sampling_settings(config) + check_loop_settings(config))
    if not errors:
        disk_errors, disk_warnings, plan.disk = check_disk_space(config, plan)
        errors.extend(disk_errors)
        plan.warnings.extend(disk_warnings)
    if errors:
        raise UserErrors(_dedupe(errors))
    if plan.dataset is not None:
        plan.steps = _steps_and_epochs(config, plan.dataset)[0]
    return plan


def _dedupe(errors: list[UserError]) -> list[UserError]:
    seen: set[str] = set()
    out = []
    for e in errors:
        if str(e) not in seen:
            seen.add(str(e))
            out.append(e)
    return out


def _output_inside_dataset(output_dir: str, dataset) -> UserError | None:
    """The LoRA, its settings JSON and tag list must not land among the training images."""
    out = os.path.realpath(output_dir)
    folders = list(getattr(dataset, "roots", []) or []) + [s.image_dir for s in getattr(dataset, "subsets", []) or []]
    for folder in folders:
        root = os.path.realpath(folder)
        if out == root or out.startswith(root.rstrip(os.sep) + os.sep):
            return ConfigError(f"output_dir: {output_dir} is inside the dataset folder {folder}; the files "
                               "written there would mix with your images; choose a folder outside the dataset", "output_dir")
    return None
