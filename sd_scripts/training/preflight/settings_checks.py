"""Preflight's checks of the settings alone (no file is read): every engine value against its declared range and
choices, the declared rules between settings (:mod:`sd_scripts.core.rules`), the few value checks a declaration
cannot say (a list of learning rates, a warm-up given as N%, max-norm with LyCORIS algorithms), the packages the
settings need, the CUDA-only options on a machine without CUDA, and the paths (:mod:`.paths`)."""

from __future__ import annotations

import importlib.util

from sd_scripts.core.config import is_finite_number as _number
from sd_scripts.core.errors import UserError
from sd_scripts.core.problems import Problems
from sd_scripts.core.rules import RULES, check_engine_values, check_rules
from sd_scripts.core.settings import declared, engine_settings

from .paths import check_input_paths, check_output

__all__ = ["check_settings"]

# LyCORIS algorithms whose modules have no max-norm of their own (lycoris-lora 4.1.3)
_NO_MAX_NORM_ALGOS = ("full", "ia3", "dylora", "glora")
_LOGGER_PACKAGES = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def check_settings(config, problems: Problems | None = None) -> list[UserError]:
    """Value and combination checks on settings alone (reads no file contents); recorded in ``problems``, whose
    errors it returns."""
    from sd_scripts.training.losses import NOISE_LOSS_RULES, NOISE_LOSS_SETTINGS

    problems = Problems() if problems is None else problems
    check_engine_values(config, problems, [s.kohya_name for s in engine_settings()
                                           if s.kohya_name not in NOISE_LOSS_SETTINGS])
    check_rules(config, "engine", problems, tuple(r for r in RULES if r not in NOISE_LOSS_RULES))
    _check_special_values(config, problems)
    _check_max_norm_algo(config, problems)
    _check_packages_and_cuda(config, problems)
    check_output(config, problems)
    check_input_paths(config, problems)
    return problems.errors


def _check_special_values(config, problems: Problems) -> None:
    """Values whose check is not a plain range."""
    if config.max_train_epochs is None:  # max_train_steps counts only without max_train_epochs
        problem = declared("max_steps").range.problem(config.max_train_steps) if config.max_train_steps is not None \
            else "must be 1 or more, got nothing"
        if problem:
            problems.error("max_train_steps", problem)
    if config.learning_rate is None:
        problems.error("learning_rate", "not set; give a learning rate such as 1e-4")
    lr = config.text_encoder_lr
    if isinstance(lr, (list, tuple)):  # one per text encoder (kohya's nargs)
        if not lr or not all(_number(v) and v >= 0 for v in lr):
            problems.error("text_encoder_lr", "give one learning rate, or one per text encoder (two for SDXL), each 0 "
                           f"or more; got {list(lr)}")
    elif lr is not None and declared("text_encoder_lr").range.problem(lr):
        problems.error("text_encoder_lr", declared("text_encoder_lr").range.problem(lr))
    if _number(config.lr_warmup_steps) and config.lr_warmup_steps < 0:
        problems.error("lr_warmup_steps", f"must be 0 or more, got {config.lr_warmup_steps:g}")


def _check_max_norm_algo(config, problems: Problems) -> None:
    if not (_number(config.scale_weight_norms) and config.scale_weight_norms > 0):
        return
    from sd_scripts.networks.factory import network_kind
    from sd_scripts.networks.network_args import split_network_args

    try:
        lycoris = network_kind(config.network_module) == "lycoris"
        algo = str(split_network_args(config.network_args).get("algo", "lora")).strip().lower()
    except UserError:
        lycoris = False  # reported by the network checks
    if lycoris and algo in _NO_MAX_NORM_ALGOS:
        problems.error("scale_weight_norms", f"LyCORIS algo={algo} has no max-norm regularization (LoCon, LoHa, LoKr "
                       "and OFT have); turn scale_weight_norms off or change algo")


def _check_packages_and_cuda(config, problems: Problems) -> None:
    for package in _LOGGER_PACKAGES.get(config.log_with, []):
        if importlib.util.find_spec(package) is None:
            problems.error("log_with", f"{config.log_with} needs the {package} package, which is not installed; "
                           f"install it (pip install {package}) or leave log_with unset")
    sampling = bool(config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first)
    if (sampling or config.sample_prompts) and config.sample_sampler:
        from sd_scripts.training.sampling import SAMPLERS

        if str(config.sample_sampler).lower() not in SAMPLERS:
            problems.error("sample_sampler", f"unknown sampler {config.sample_sampler!r}; choose one of "
                           f"{', '.join(SAMPLERS)}")
    if config.mixed_precision == "fp16" and not _cuda_available():
        problems.error("mixed_precision", "fp16 needs a CUDA GPU; use no (or bf16) on this machine")
    if config.xformers and not _cuda_available():
        problems.error("xformers", "xformers needs a CUDA GPU; turn it off (SDPA attention is used by default)")
    elif config.xformers and importlib.util.find_spec("xformers") is None:
        problems.error("xformers", "the xformers package is not installed; install it or turn xformers off (SDPA "
                       "attention is used by default)")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
