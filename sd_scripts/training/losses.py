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
from typing import Any

import torch
import torch.nn.functional as F

from sd_scripts.core.config import is_finite_number as _number, is_whole_number as _whole
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.training.noise import apply_masked_loss, min_snr_weights

__all__ = ["LOSS_TYPES", "HUBER_SCHEDULES", "huber_threshold", "elementwise_loss", "per_sample_loss",
           "snr_loss_weights", "huber_c_for", "loss_weights_for", "check_noise_loss_settings",
           "prediction_type_problems"]

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
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


def check_noise_loss_settings(config: Any) -> tuple[list[UserError], list[str]]:
    """Values and combinations of the noise and loss settings (preflight): ``(errors, warnings)``."""
    errors: list[UserError] = []
    warnings: list[str] = []

    def bad(setting: str, text: str) -> None:
        errors.append(ConfigError(f"{setting}: {text}", setting))

    def get(name: str, default: Any = None) -> Any:
        return getattr(config, name, default)

    noise_offset = get("noise_offset")
    adaptive = get("adaptive_noise_scale")
    if adaptive is not None:
        if not _number(adaptive):
            bad("adaptive_noise_scale", f"must be a number, got {adaptive!r}")
        elif not noise_offset:
            bad("adaptive_noise_scale", "needs noise_offset (the scaled latent mean is added to the offset); set "
                "noise_offset, e.g. 0.05, or leave adaptive_noise_scale unset")
    if get("noise_offset_random_strength") and not noise_offset:
        warnings.append("noise_offset_random_strength has no effect without noise_offset")
    gamma = get("ip_noise_gamma")
    if gamma is not None and (not _number(gamma) or gamma < 0):
        bad("ip_noise_gamma", f"must be 0 or more (about 0.1 is usual; unset turns it off), got {gamma!r}")
    if get("ip_noise_gamma_random_strength") and not gamma:
        warnings.append("ip_noise_gamma_random_strength has no effect without ip_noise_gamma")
    _check_timesteps(get("min_timestep"), get("max_timestep"), bad)
    loss_type = get("loss_type", "l2")
    if loss_type not in LOSS_TYPES:
        bad("loss_type", f"{loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    elif loss_type in ("huber", "smooth_l1"):
        schedule = get("huber_schedule", "snr")
        if schedule not in HUBER_SCHEDULES:
            bad("huber_schedule", f"{schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")
        huber_c, huber_scale = get("huber_c", 0.1), get("huber_scale", 1.0)
        if not _number(huber_c) or not 0 < huber_c <= 1:
            bad("huber_c", f"must be above 0 and at most 1 (0.1 is kohya's default), got {huber_c!r}")
        if not _number(huber_scale) or huber_scale <= 0:
            bad("huber_scale", f"must be above 0 (1 is kohya's default), got {huber_scale!r}")
    like = get("v_pred_like_loss")
    if like is not None and (not _number(like) or like < 0):
        bad("v_pred_like_loss", f"must be 0 or more (unset turns it off), got {like!r}")
    return errors, warnings


def _check_timesteps(low: Any, high: Any, bad) -> None:
    for name, value in (("min_timestep", low), ("max_timestep", high)):
        if value is not None and (not _whole(value) or not 0 <= value <= 1000):
            bad(name, f"must be a whole number from 0 to 1000, got {value!r}")
            return
    low_value = 0 if low is None else low
    high_value = 1000 if high is None else high
    if low_value > high_value:
        bad("min_timestep", f"{low_value} is above max_timestep {high_value}; timesteps are drawn from min_timestep "
            "up to below max_timestep (equal values train one constant timestep)")
    elif low_value == high_value == 1000:
        bad("min_timestep", "a constant timestep (min_timestep = max_timestep) must be 999 or lower; the schedule "
            "has timesteps 0 to 999")


def prediction_type_problems(config: Any, v_parameterization: bool) -> tuple[list[UserError], list[str]]:
    """The settings that depend on the model's prediction type (epsilon or v): ``(errors, warnings)``."""
    errors: list[UserError] = []
    warnings: list[str] = []
    if config.scale_v_pred_loss_like_noise_pred and not v_parameterization:
        errors.append(ConfigError("scale_v_pred_loss_like_noise_pred: needs a v-prediction model; set "
                                  "v_parameterization for one, or turn scale_v_pred_loss_like_noise_pred off",
                                  "scale_v_pred_loss_like_noise_pred"))
    if config.v_pred_like_loss and v_parameterization:
        errors.append(ConfigError("v_pred_like_loss: cannot be used with v_parameterization (the model already "
                                  "predicts v); leave v_pred_like_loss unset", "v_pred_like_loss"))
    if config.zero_terminal_snr and not v_parameterization:
        warnings.append("zero_terminal_snr is on but the model predicts noise (epsilon), not v: an epsilon model "
                        "cannot learn the last, pure-noise timestep (kohya warns the same); use it with "
                        "v_parameterization models")
        high = 1000 if config.max_timestep is None else config.max_timestep
        low = 0 if config.min_timestep is None else config.min_timestep
        reaches_last = high == 1000 or (low == high == 999)
        divides = [name for name in ("min_snr_gamma", "debiased_estimation_loss", "v_pred_like_loss")
                   if getattr(config, name)]
        if reaches_last and divides:
            errors.append(ConfigError(f"{divides[0]}: with zero_terminal_snr and an epsilon model the last "
                                      "timestep has SNR 0, which this weighting divides by (the loss would be "
                                      "NaN/inf); set max_timestep 999 or lower, use a v_parameterization model, or "
                                      f"turn {divides[0]} off", divides[0]))
    return errors, warnings


def huber_c_for(config: Any, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """The per-sample Huber ``c`` of a training step under ``config``; None unless loss_type is huber or smooth_l1."""
    if config.loss_type not in ("huber", "smooth_l1"):
        return None
    return huber_threshold(timesteps, alphas_cumprod, config.huber_schedule, config.huber_c, config.huber_scale)


def loss_weights_for(config: Any, snr: torch.Tensor, v_prediction: bool) -> torch.Tensor | None:
    """:func:`snr_loss_weights` of a training step under ``config``."""
    return snr_loss_weights(snr, v_prediction, min_snr_gamma=config.min_snr_gamma,
                            scale_v_pred_loss_like_noise_pred=config.scale_v_pred_loss_like_noise_pred,
                            v_pred_like_loss=config.v_pred_like_loss,
                            debiased_estimation_loss=config.debiased_estimation_loss)
