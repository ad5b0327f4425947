"""Preflight: every check that can run before a model is loaded, all problems reported together.

``preflight(config)`` returns a :class:`Plan` (the scanned dataset, the detected model family,
warnings) or raises :class:`UserErrors` listing every problem found, each one line naming the
setting and the fix. Nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UserError, UserErrors

__all__ = ["Plan", "preflight", "check_settings"]


@dataclass
class Plan:
    dataset: Any = None
    family: Any = None
    model_info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _int_or_none(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def check_settings(config) -> list[UserError]:
    """Value and combination checks on settings alone (no files read)."""
    errors: list[UserError] = []

    def bad(setting: str, text: str) -> None:
        errors.append(ConfigError(f"{setting}: {text}", setting=setting))

    if config.train_batch_size < 1:
        bad("train_batch_size", f"must be 1 or more, got {config.train_batch_size}")
    if config.gradient_accumulation_steps < 1:
        bad("gradient_accumulation_steps", f"must be 1 or more, got {config.gradient_accumulation_steps}")
    if config.max_train_epochs is None and config.max_train_steps < 1:
        bad("max_train_steps", f"must be 1 or more, got {config.max_train_steps}")
    if config.max_train_epochs is not None and config.max_train_epochs < 1:
        bad("max_train_epochs", f"must be 1 or more, got {config.max_train_epochs}")
    if config.learning_rate is None or config.learning_rate < 0:
        bad("learning_rate", f"must be 0 or more, got {config.learning_rate}")
    if config.network_dim is not None and config.network_dim < 1:
        bad("network_dim", f"must be 1 or more, got {config.network_dim}")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        bad("mixed_precision", f"{config.mixed_precision!r} is not one of no, fp16, bf16")
    if config.save_precision not in (None, "float", "fp32", "fp16", "bf16"):
        bad("save_precision", f"{config.save_precision!r} is not one of float, fp16, bf16")
    if config.save_model_as not in ("safetensors", "ckpt", "pt"):
        bad("save_model_as", f"{config.save_model_as!r} is not one of safetensors, ckpt, pt")
    if config.max_token_length not in (None, 75, 150, 225):
        bad("max_token_length", f"must be 75, 150 or 225, got {config.max_token_length}")
    if config.clip_skip is not None and not 1 <= config.clip_skip <= 12:
        bad("clip_skip", f"must be between 1 and 12, got {config.clip_skip}")
    if config.network_train_unet_only and config.network_train_text_encoder_only:
        bad("network_train_unet_only", "cannot be combined with network_train_text_encoder_only; pick one")
    if config.full_fp16 and config.mixed_precision != "fp16":
        bad("full_fp16", "needs mixed_precision fp16")
    if config.full_bf16 and config.mixed_precision != "bf16":
        bad("full_bf16", "needs mixed_precision bf16")
    if config.min_snr_gamma is not None and config.min_snr_gamma <= 0:
        bad("min_snr_gamma", f"must be above 0, got {config.min_snr_gamma}")
    if config.noise_offset is not None and config.noise_offset < 0:
        bad("noise_offset", f"must be 0 or more, got {config.noise_offset}")
    if config.prior_loss_weight < 0:
        bad("prior_loss_weight", f"must be 0 or more, got {config.prior_loss_weight}")
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                 "sample_every_n_steps", "sample_every_n_epochs", "save_n_epoch_ratio"):
        value = getattr(config, name)
        if value is not None and value < 1:
            bad(name, f"must be 1 or more when given, got {value}")
    if (config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first) and not config.sample_prompts:
        bad("sample_prompts", "sampling is on (sample_every_n_*/sample_at_first) but no prompt file is given; set sample_prompts")
    if not config.output_dir:
        bad("output_dir", "not set; give the folder where the LoRA should be saved")
    elif os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        bad("output_dir", f"{config.output_dir} is a file, not a folder")
    if config.output_name and any(c in config.output_name for c in '/\\:*?"<>|'):
        bad("output_name", f"{config.output_name!r} contains characters not allowed in file names")
    if config.mixed_precision == "fp16" and not _cuda_available():
        bad("mixed_precision", "fp16 needs a CUDA GPU; use no (or bf16) on this machine")
    if config.xformers and not _cuda_available():
        bad("xformers", "xformers needs a CUDA GPU; turn it off (SDPA attention is used by default)")
    for name in ("network_weights", "vae", "dataset_config", "sample_prompts"):
        value = getattr(config, name)
        if value and not os.path.exists(value):
            bad(name, f"not found: {value}; check the path")
    if config.resume and not os.path.isdir(config.resume):
        bad("resume", f"state folder not found: {config.resume}")
    return errors


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def preflight(config, model_given: bool = False) -> Plan:
    """Check everything that can be checked before the model loads; raise UserErrors on any problem."""
    from .dataset_layout import scan_dataset
    from .model_loading import detect_family
    from .optimizers import check_optimizer_settings

    errors = check_settings(config)
    plan = Plan()
    try:
        plan.warnings.extend(check_optimizer_settings(config) or [])
    except UserErrors as e:
        errors.extend(e.errors)
    except UserError as e:
        errors.append(e)
    if model_given:
        pass
    elif not config.pretrained_model_name_or_path:
        errors.append(ConfigError("pretrained_model_name_or_path: not set; give a .safetensors/.ckpt file or a diffusers folder"))
    else:
        try:
            plan.family, plan.model_info = detect_family(config)
        except UserError as e:
            errors.append(e)
    if config.sample_prompts and os.path.isfile(config.sample_prompts):
        from .sampling import load_sample_prompts, make_sampler

        try:
            load_sample_prompts(config.sample_prompts)
        except UserError as e:
            errors.append(e)
        from .sampling import SAMPLERS

        if config.sample_sampler.lower() not in SAMPLERS:
            errors.append(ConfigError(f"sample_sampler: unknown sampler {config.sample_sampler!r}; choose one of {', '.join(SAMPLERS)}"))
    try:
        plan.dataset = scan_dataset(config)
        plan.warnings.extend(getattr(plan.dataset, "warnings", []) or [])
    except UserErrors as e:
        errors.extend(e.errors)
    except UserError as e:
        errors.append(e)
    if errors:
        raise UserErrors(errors)
    return plan
