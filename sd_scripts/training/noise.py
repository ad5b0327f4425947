"""Noise, timesteps, targets and loss weighting of the diffusion training step.

Formulas follow kohya-ss/sd-scripts: DDPM scaled-linear schedule (0.00085 -> 0.012, 1000 steps),
uniform timesteps (optionally within ``[min_timestep, max_timestep)``), noise offset ``o * randn(B, C, 1, 1)``
(optionally of random strength and adaptive to the latents' mean), multi-resolution (pyramid) noise,
input-perturbation noise, the zero-terminal-SNR schedule, epsilon or v-prediction targets, and
min-SNR-gamma weights in their epsilon and v forms. Loss types and the other loss weightings are in
:mod:`.loss_terms`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "make_noise_scheduler",
    "rescale_zero_terminal_snr",
    "sample_noise",
    "sample_timesteps",
    "perturb_noise",
    "add_noise",
    "velocity_target",
    "snr_of",
    "min_snr_weights",
    "per_sample_mse",
    "apply_masked_loss",
]


def make_noise_scheduler(v_parameterization: bool, zero_terminal_snr: bool = False):
    """kohya's training schedule: DDPM scaled_linear, 1000 steps, no sample clipping; with
    ``zero_terminal_snr`` its betas, alphas and alphas_cumprod are those of :func:`rescale_zero_terminal_snr`."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(scheduler.betas)
        scheduler.betas = betas
        scheduler.alphas = 1.0 - betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last timestep has zero SNR (Lin et al. 2023, arXiv 2305.08891, algorithm 1): sqrt(alphas_cumprod)
    is shifted and scaled linearly so that its last value is 0 and its first is unchanged."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def sample_noise(latents: torch.Tensor, noise_offset: float | None = None,
                 multires_iterations: int | None = None, multires_discount: float = 0.3, *,
                 random_strength: bool = False, adaptive_noise_scale: float | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, with optional offset and pyramid noise.

    The offset ``o`` is ``noise_offset``, or ``U(0, noise_offset)`` with ``random_strength``; with
    ``adaptive_noise_scale`` ``s`` it becomes ``max(0, o + s * |mean_HW(latents)|)`` per sample and channel.
    """
    noise = torch.randn_like(latents)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = noise_offset
        if random_strength:
            offset = torch.rand(1, device=latents.device) * noise_offset
        if adaptive_noise_scale is not None:
            latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
        noise = noise + offset * torch.randn((b, c, 1, 1), device=latents.device, dtype=latents.dtype)
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


def sample_timesteps(batch_size: int, device, num_train_timesteps: int = 1000, *,
                     min_timestep: int | None = None, max_timestep: int | None = None) -> torch.Tensor:
    """One timestep per sample, uniform in ``[min_timestep, max_timestep)`` (default ``[0, 1000)``);
    the constant ``max_timestep`` when the two are equal."""
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    if low < high:
        return torch.randint(low, high, (batch_size,), device=device).long()
    return torch.full((batch_size,), high, dtype=torch.long, device=device)


def perturb_noise(noise: torch.Tensor, ip_noise_gamma: float | None, random_strength: bool = False) -> torch.Tensor:
    """The noise added to the latents under input perturbation (Ning et al. 2023, arXiv 2301.11706):
    ``noise + g * randn_like(noise)``, ``g`` = ``ip_noise_gamma`` or ``U(0, ip_noise_gamma)`` with
    ``random_strength``. The training target stays ``noise``. Draws nothing when ``ip_noise_gamma`` is unset."""
    if not ip_noise_gamma:
        return noise
    strength = ip_noise_gamma
    if random_strength:
        strength = torch.rand(1, device=noise.device) * ip_noise_gamma
    return noise + strength * torch.randn_like(noise)


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
