"""Loss types, Huber thresholds and SNR loss weightings of the training step, and the checks of the
noise and loss settings.

Formulas follow kohya-ss/sd-scripts (``conditional_loss``, ``get_huber_threshold_if_needed`` and
``post_process_loss``):

* loss types on ``d = pred - target``: l2 ``d^2``; l1 ``|d|``; huber ``2c(sqrt(d^2 + c^2) - c)``; smooth_l1
  ``2(sqrt(d^2 + c^2) - c)``, with one ``c`` per sample from the Huber schedule: constant ``huber_c * huber_scale``;
  exponential ``exp(-t * (-ln huber_c) / 1000) * huber_scale``; snr ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c``
  with ``sigma_t = sqrt((1 - a_t) / a_t)``.
* weightings of the per-sample loss, applied in this order (``snr' = min(snr, 1000)``): min-SNR-gamma
  (:func:`.noise.min_snr_weights`); ``scale_v_pred_loss_like_noise_pred`` ``snr' / (snr' + 1)``;
  ``v_pred_like_loss`` ``l`` adds ``l * loss * (snr' + 1) / snr'``; ``debiased_estimation_loss`` ``1 / sqrt(snr')``
  (epsilon) or ``1 / (snr' + 1)`` (v-prediction).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.config import is_finite_number as _number
from sd_scripts.core.errors import UserError
from sd_scripts.core.problems import Problems
from sd_scripts.core.rules import RULES, check_engine_values, check_rules
from sd_scripts.core.settings import declared_in_engine
from sd_scripts.training.noise import apply_masked_loss, min_snr_weights

__all__ = ["LOSS_TYPES", "HUBER_SCHEDULES", "huber_threshold", "elementwise_loss", "per_sample_loss",
           "snr_loss_weights", "huber_c_for", "loss_weights_for", "check_noise_loss_settings",
           "prediction_type_problems"]

LOSS_TYPES = declared_in_engine("loss_type").choices
HUBER_SCHEDULES = declared_in_engine("huber_schedule").choices
# the settings whose declared ranges and choices check_noise_loss_settings checks, and its rules
NOISE_LOSS_SETTINGS = ("adaptive_noise_scale", "ip_noise_gamma", "min_timestep", "max_timestep", "loss_type",
                       "v_pred_like_loss")
NOISE_LOSS_RULES = tuple(rule for rule in RULES if rule.setting in (
    "adaptive_noise_scale", "noise_offset_random_strength", "ip_noise_gamma_random_strength", "min_timestep"))
# kohya caps the SNR at 1000 in these weightings (the SNR of timestep 0 is about 1175)
_SNR_CAP = 1000.0


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, huber_c: float,
                    huber_scale: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Huber ``c`` of each sample, from its timestep and the schedule (constant, exponential, snr)."""
    if schedule == "exponential":
        decay = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-decay * timesteps.float()) * huber_scale
    if schedule == "snr":
        a = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element, in float32; ``huber_c`` (one per sample) is needed by huber and smooth_l1."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r}")
    c = huber_c.to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: torch.Tensor | None = None, alpha_masks: torch.Tensor | None = None) -> torch.Tensor:
    """The loss averaged over every dimension but the batch, each element first weighted by its mask
    (:func:`.noise.apply_masked_loss`); for l2 exactly :func:`.noise.per_sample_mse`."""
    loss = apply_masked_loss(elementwise_loss(pred, target, loss_type, huber_c), alpha_masks)
    return loss.mean(dim=list(range(1, pred.dim())))


def snr_loss_weights(snr: torch.Tensor, v_prediction: bool, *, min_snr_gamma: float | None = None,
                     scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float | None = None,
                     debiased_estimation_loss: bool = False) -> torch.Tensor | None:
    """The product of the per-sample loss weights the settings turn on, or None when none is on."""
    factors = []
    if min_snr_gamma:
        factors.append(min_snr_weights(snr, min_snr_gamma, v_prediction))
    capped = torch.clamp(snr, max=_SNR_CAP)
    if scale_v_pred_loss_like_noise_pred:
        factors.append(capped / (capped + 1))
    if v_pred_like_loss:
        factors.append(1 + v_pred_like_loss * (capped + 1) / capped)
    if debiased_estimation_loss:
        factors.append(1 / (capped + 1) if v_prediction else 1 / capped.sqrt())
    if not factors:
        return None
    weights = factors[0]
    for factor in factors[1:]:
        weights = weights * factor
    return weights


def check_noise_loss_settings(config: TrainConfig, problems: Problems | None = None) -> tuple[list[UserError], list[str]]:
    """Values and combinations of the noise and loss settings (preflight): recorded in ``problems``; returns its
    ``(errors, warnings)``."""
    problems = Problems() if problems is None else problems
    # one timestep out of range at a time, min_timestep first (as the message has always read)
    min_problem = declared_in_engine("min_timestep").engine_problem(config.min_timestep)
    check_engine_values(config, problems, [n for n in NOISE_LOSS_SETTINGS if not (n == "max_timestep" and min_problem)])
    check_rules(config, "engine", problems, NOISE_LOSS_RULES)
    if config.loss_type in ("huber", "smooth_l1"):
        if config.huber_schedule not in HUBER_SCHEDULES:
            problems.error("huber_schedule", f"{config.huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")
        if not _number(config.huber_c) or not 0 < config.huber_c <= 1:
            problems.error("huber_c", f"must be above 0 and at most 1 (0.1 is kohya's default), got {config.huber_c!r}")
        if not _number(config.huber_scale) or config.huber_scale <= 0:
            problems.error("huber_scale", f"must be above 0 (1 is kohya's default), got {config.huber_scale!r}")
    return problems.errors, problems.warnings


def prediction_type_problems(config: TrainConfig, v_parameterization: bool,
                             problems: Problems | None = None) -> tuple[list[UserError], list[str]]:
    """The settings that depend on the model's prediction type (epsilon or v), recorded in ``problems``; returns
    its ``(errors, warnings)``."""
    problems = Problems() if problems is None else problems
    if config.scale_v_pred_loss_like_noise_pred and not v_parameterization:
        problems.error("scale_v_pred_loss_like_noise_pred", "needs a v-prediction model; set v_parameterization for "
                       "one, or turn scale_v_pred_loss_like_noise_pred off")
    if config.v_pred_like_loss and v_parameterization:
        problems.error("v_pred_like_loss", "cannot be used with v_parameterization (the model already predicts v); "
                       "leave v_pred_like_loss unset")
    if config.zero_terminal_snr and not v_parameterization:
        problems.warn("zero_terminal_snr is on but the model predicts noise (epsilon), not v: an epsilon model "
                      "cannot learn the last, pure-noise timestep (kohya warns the same); use it with "
                      "v_parameterization models")
        high = 1000 if config.max_timestep is None else config.max_timestep
        low = 0 if config.min_timestep is None else config.min_timestep
        reaches_last = high == 1000 or (low == high == 999)
        divides = [name for name, on in (("min_snr_gamma", config.min_snr_gamma),
                                         ("debiased_estimation_loss", config.debiased_estimation_loss),
                                         ("v_pred_like_loss", config.v_pred_like_loss)) if on]
        if reaches_last and divides:
            problems.error(divides[0], "with zero_terminal_snr and an epsilon model the last timestep has SNR 0, "
                           "which this weighting divides by (the loss would be NaN/inf); set max_timestep 999 or "
                           f"lower, use a v_parameterization model, or turn {divides[0]} off")
    return problems.errors, problems.warnings


def huber_c_for(config: TrainConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """The per-sample Huber ``c`` of a training step under ``config``; None unless loss_type is huber or smooth_l1."""
    if config.loss_type not in ("huber", "smooth_l1"):
        return None
    return huber_threshold(timesteps, alphas_cumprod, config.huber_schedule, config.huber_c, config.huber_scale)


def loss_weights_for(config: TrainConfig, snr: Callable[[], torch.Tensor], v_prediction: bool) -> torch.Tensor | None:
    """:func:`snr_loss_weights` of a training step under ``config``; ``snr()`` gives the per-sample SNR and is called
    only when a weighting is on (a step without one computes no SNR)."""
    settings = dict(min_snr_gamma=config.min_snr_gamma,
                    scale_v_pred_loss_like_noise_pred=config.scale_v_pred_loss_like_noise_pred,
                    v_pred_like_loss=config.v_pred_like_loss, debiased_estimation_loss=config.debiased_estimation_loss)
    if not any(settings.values()):
        return None
    return snr_loss_weights(snr(), v_prediction, **settings)
