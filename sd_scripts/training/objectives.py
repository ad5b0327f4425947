"""Training objectives: how a batch's latents are noised, what the denoiser is trained to predict, and how the loss
is weighted. A model family names its objective (``ModelFamily.objective``); the loop only calls these methods.

* ``DDPMObjective`` (SD1/SD2/SDXL): kohya's scaled-linear DDPM schedule, integer timesteps in
  ``[min_timestep, max_timestep)``, input-perturbation noise, the noise (or v) target, Huber thresholds and the
  SNR-based weights. Same draws in the same order as before the objectives existed.
* ``FlowMatchingObjective`` (FLUX.1): rectified flow ``x_t = (1 - s) x0 + s n`` with the velocity target
  ``n - x0``, kohya's ``timestep_sampling`` (sigma, uniform, sigmoid, shift, flux_shift; ``sigmoid_scale``,
  ``discrete_flow_shift``), ``weighting_scheme`` densities (logit_normal, mode) and loss weights (sigma_sqrt, cosmap,
  with ``model_prediction_type`` sigma_scaled), and the prediction types raw, additive and sigma_scaled
  (kohya flux_train_utils.get_noisy_model_input_and_timesteps / apply_model_prediction_type). The denoiser gets
  ``timesteps`` = sigma x 1000 (kohya's convention); FLUX's ``predict`` divides by 1000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DDPMObjective", "FlowMatchingObjective", "Noised", "flow_sigma_schedule", "make_objective",
           "sample_flow_sigmas", "flow_loss_weights", "apply_prediction_type"]


@dataclass
class Noised:
    """A noised batch: what the denoiser gets and what its output is compared with."""

    model_input: torch.Tensor  # noisy latents
    timesteps: torch.Tensor  # as the family's predict takes them
    latents: torch.Tensor
    noise: torch.Tensor  # the target noise (without input perturbation)
    sigmas: torch.Tensor | None = None  # flow matching: [B] in (0, 1]


# ---------------------------------------------------------------------------------------------------------- DDPM


class DDPMObjective:
    name = "ddpm"

    def __init__(self, config, v_parameterization: bool, device):
        from sd_scripts.training.noise import make_noise_scheduler

        self.config = config
        self.v_param = bool(v_parameterization)
        self.scheduler = make_noise_scheduler(self.v_param, config.zero_terminal_snr)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> Noised:
        from sd_scripts.training.noise import sample_timesteps

        config = self.config
        timesteps = sample_timesteps(latents.shape[0], latents.device, min_timestep=config.min_timestep,
                                     max_timestep=config.max_timestep)
        return self.noised_at(latents, noise, timesteps)

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  perturb: bool = True) -> Noised:
        """Latents noised at ``timesteps``; ``perturb`` False (validation) leaves input perturbation out."""
        from sd_scripts.training.noise import add_noise, perturb_noise

        config = self.config
        # input perturbation (ip_noise_gamma) noises the latents with more than the target noise
        if perturb:
            noise_in = perturb_noise(noise, config.ip_noise_gamma, config.ip_noise_gamma_random_strength)
        else:
            noise_in = noise
        noisy = add_noise(self.alphas_cumprod, latents, noise_in, timesteps)
        return Noised(noisy, timesteps, latents, noise)

    def prediction_and_target(self, pred: torch.Tensor, noised: Noised) -> tuple[torch.Tensor, torch.Tensor]:
        from sd_scripts.training.noise import velocity_target

        if self.v_param:
            return pred, velocity_target(self.alphas_cumprod, noised.latents, noised.noise, noised.timesteps)
        return pred, noised.noise

    def huber_c(self, noised: Noised):
        from sd_scripts.training.losses import huber_c_for

        return huber_c_for(self.config, noised.timesteps, self.alphas_cumprod)

    def loss_weights(self, noised: Noised):
        """Per-sample weights (min-SNR, scaled v loss, v-pred-like, debiased), or None."""
        from sd_scripts.training.losses import loss_weights_for
        from sd_scripts.training.noise import snr_of

        return loss_weights_for(self.config, lambda: snr_of(self.alphas_cumprod, noised.timesteps), self.v_param)

    def validation_timesteps(self, count: int, device) -> list[torch.Tensor]:
        """Fixed timesteps of a validation batch (kohya: 200, 400, 600, 800)."""
        return [torch.full((count,), t, dtype=torch.long, device=device) for t in (200, 400, 600, 800)]


# ------------------------------------------------------------------------------------------------- flow matching


def flow_sigma_schedule(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """kohya's FlowMatchEulerDiscreteScheduler sigmas: ``t = 1000 ... 1`` / 1000, shifted ``s t / (1 + (s-1) t)``;
    index 0 is sigma 1 (pure noise)."""
    steps = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    sigmas = steps / num_train_timesteps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _density(scheme: str, batch: int, logit_mean: float, logit_std: float, mode_scale: float) -> torch.Tensor:
    """kohya's compute_density_for_timestep_sampling (SD3 paper): u in [0, 1), drawn on the CPU."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device="cpu"))
    u = torch.rand(size=(batch,), device="cpu")
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _flux_shift_mu(image_seq_len: int) -> float:
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * image_seq_len + (0.5 - slope * 256)


def sample_flow_sigmas(config, batch: int, latent_hw: tuple[int, int], device,
                       schedule: torch.Tensor) -> torch.Tensor:
    """One sigma per sample by kohya's ``timestep_sampling`` (see the module doc)."""
    method = config.timestep_sampling
    if method in ("uniform", "sigmoid"):
        if method == "sigmoid":
            return torch.sigmoid(config.sigmoid_scale * torch.randn((batch,), device=device))
        return torch.rand((batch,), device=device)
    if method == "shift":
        shift = config.discrete_flow_shift
        sigmas = (torch.randn(batch, device=device) * config.sigmoid_scale).sigmoid()
        return (sigmas * shift) / (1 + (shift - 1) * sigmas)
    if method == "flux_shift":
        sigmas = (torch.randn(batch, device=device) * config.sigmoid_scale).sigmoid()
        mu = _flux_shift_mu((latent_hw[0] // 2) * (latent_hw[1] // 2))
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    u = _density(config.weighting_scheme, batch, config.logit_mean, config.logit_std, config.mode_scale)
    indices = (u * len(schedule)).long()
    return schedule[indices].to(device)


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """kohya's compute_loss_weighting_for_sd3: sigma_sqrt ``sigma^-2``, cosmap ``2 / (pi (1 - 2s + 2s^2))``, else 1."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def apply_prediction_type(kind: str, pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                          scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kohya's apply_model_prediction_type: ``(prediction, element weights or None)``; ``sigmas`` broadcast [B,1,1,1]."""
    if kind == "additive":
        return pred + noisy, None
    if kind == "sigma_scaled":
        return pred * (-sigmas) + noisy, flow_loss_weights(scheme, sigmas)
    return pred, None


class FlowMatchingObjective:
    name = "flow_matching"

    def __init__(self, config, device):
        self.config = config
        self.schedule = flow_sigma_schedule(float(config.discrete_flow_shift))
        self.alphas_cumprod = None  # no DDPM schedule

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> Noised:
        sigmas = sample_flow_sigmas(self.config, latents.shape[0], tuple(latents.shape[-2:]), latents.device,
                                    self.schedule)
        return self.noised_with(latents, noise, sigmas)

    def noised_with(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                    perturb: bool = True) -> Noised:
        from sd_scripts.training.noise import perturb_noise

        config = self.config
        s = sigmas.view(-1, 1, 1, 1).to(latents.device)
        noise_in = perturb_noise(noise, config.ip_noise_gamma, config.ip_noise_gamma_random_strength) if perturb \
            else noise
        noisy = (1.0 - s) * latents.float() + s * noise_in.float()
        return Noised(noisy.to(latents.dtype), (sigmas * 1000).to(latents.device), latents, noise,
                      sigmas.to(latents.device))

    def noised_at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  perturb: bool = True) -> Noised:
        return self.noised_with(latents, noise, timesteps.float() / 1000, perturb)

    def prediction_and_target(self, pred: torch.Tensor, noised: Noised) -> tuple[torch.Tensor, torch.Tensor]:
        pred, _ = apply_prediction_type(self.config.model_prediction_type, pred.float(), noised.model_input.float(),
                                        noised.sigmas.view(-1, 1, 1, 1), self.config.weighting_scheme)
        return pred, noised.noise.float() - noised.latents.float()

    def huber_c(self, noised: Noised):
        from sd_scripts.training.losses import huber_c_for

        return huber_c_for(self.config, noised.timesteps, None)

    def loss_weights(self, noised: Noised):
        """Per-sample weights: kohya's sigma_sqrt / cosmap weighting with sigma_scaled predictions, else None."""
        if self.config.model_prediction_type != "sigma_scaled":
            return None
        return flow_loss_weights(self.config.weighting_scheme, noised.sigmas.float())

    def validation_timesteps(self, count: int, device) -> list[torch.Tensor]:
        """Fixed sigmas 0.2, 0.4, 0.6, 0.8 (as timesteps x 1000)."""
        return [torch.full((count,), t, dtype=torch.float32, device=device) for t in (200.0, 400.0, 600.0, 800.0)]


def make_objective(family, config, v_parameterization: bool, device):
    """The objective the family trains with."""
    if family.objective == FlowMatchingObjective.name:
        return FlowMatchingObjective(config, device)
    if family.objective == DDPMObjective.name:
        return DDPMObjective(config, v_parameterization, device)
    raise ValueError(f"unknown training objective {family.objective!r}")
