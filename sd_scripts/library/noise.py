"""Noise, timesteps, targets and loss weighting of the diffusion training step.

Formulas follow kohya-ss/sd-scripts: DDPM scaled-linear schedule (0.00085 -> 0.012, 1000 steps),
uniform timesteps, noise offset ``o * randn(B, C, 1, 1)``, multi-resolution (pyramid) noise,
epsilon or v-prediction targets, and min-SNR-gamma weights in their epsilon and v forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "make_noise_scheduler",
    "sample_noise",
    "sample_timesteps",
    "add_noise",
    "velocity_target",
    "snr_of",
    "min_snr_weights",
    "per_sample_mse",
    "apply_masked_loss",
]


def make_noise_scheduler(v_parameterization: bool):
    """kohya's training schedule: DDPM scaled_linear, 1000 steps, no sample clipping."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def sample_noise(latents: torch.Tensor, noise_offset: float | None = None,
                 multires_iterations: int | None = None, multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, with optional offset and pyramid noise."""
    noise = torch.randn_like(latents)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), device=latents.device, dtype=latents.dtype)
    if multires_iterations:
        noise = _pyramid_noise(noise, multires_iterations, multires_discount)
    return noise


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    # Multi-resolution noise (Whitaker 2023): add upsampled low-resolution noise, scaled by discount**i.
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(torch.rand(1).item()) * 2 + 2  # r ~ U(2, 4)
        hi, wi = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        low = torch.randn(b, c, hi, wi, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hi == 1 or wi == 1:
            break
    return noise / noise.std()


def sample_timesteps(batch_size: int, device, num_train_timesteps: int = 1000) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device).long()


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` computed in float32, returned in the latents' dtype."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def velocity_target(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()


def snr_of(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): eps ``min(snr, g)/snr``; v ``min(snr, g)/(snr + 1)``."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def apply_masked_loss(loss: torch.Tensor, alpha_masks: torch.Tensor | None) -> torch.Tensor:
    """kohya's ``apply_masked_loss``: the element-wise ``loss`` ``[B, C, h, w]`` times the masks ``[B, H, W]``
    (0..1, image resolution) resized to ``(h, w)`` with area interpolation; ``None`` leaves it as it is."""
    if alpha_masks is None:
        return loss
    mask = alpha_masks.to(device=loss.device, dtype=loss.dtype).unsqueeze(1)
    mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    return loss * mask


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, alpha_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error averaged over every dimension but the batch; with ``alpha_masks`` each element is
    first weighted by its mask (:func:`apply_masked_loss`; the mean still divides by every element, as kohya's)."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return apply_masked_loss(loss, alpha_masks).mean(dim=list(range(1, pred.dim())))
