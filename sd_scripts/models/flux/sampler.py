"""FLUX.1's sampler: flow-matching Euler steps on BFL's shifted schedule (kohya's ``sample_image_inference``).

The schedule runs sigma from 1 to 0 in ``steps`` steps, shifted towards high noise by ``mu`` = a line through
(256 tokens, 0.5) and (4096 tokens, 1.15) at the image's packed token count: ``t' = e^mu / (e^mu + 1/t - 1)``.
Each step moves the packed latents by ``(t_next - t) * v``. ``--g`` is the distilled guidance scale dev embeds
(3.5 by default; schnell ignores it); ``--l`` other than 1 adds true classifier-free guidance with the negative prompt.
"""

from __future__ import annotations

import math

import torch

from sd_scripts.models.flux.packing import image_ids, pack_latents, text_ids, unpack_latents

__all__ = ["flux_schedule", "time_shift", "shift_mu", "sample_flux"]


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The schedule shift for ``image_seq_len`` packed tokens: linear through (256, base) and (4096, max)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """``num_steps + 1`` sigmas from 1 to 0 (the last one 0)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(shift_mu(image_seq_len), 1.0, timesteps)
    return timesteps.tolist()


@torch.no_grad()
def sample_flux(model, family, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                guidance: float, cfg_scale: float, generator: torch.Generator, on_step=None):
    """One image (PIL) from the loaded FLUX parts with the current weights."""
    from PIL import Image

    transformer, vae = model.unet, model.vae
    device, dtype = transformer.device, transformer.dtype
    height, width = max(64, height - height % 16), max(64, width - width % 16)
    cond = family.encode_prompts(model, [prompt])
    negative = family.encode_prompts(model, [negative_prompt or ""]) if cfg_scale != 1.0 else None
    latent_h, latent_w = height // 8, width // 8
    noise = torch.randn(1, family.latent_channels, latent_h, latent_w, generator=generator, dtype=torch.float32)
    img = pack_latents(noise).to(device, dtype)
    ids = image_ids(1, latent_h, latent_w, device=device)
    mask_on = bool(model.options.get("apply_t5_attn_mask", False))
    guidance_vec = torch.full((1,), float(guidance), device=device) if transformer.is_dev else None

    def velocity(c, t_vec):
        txt = c["txt"].to(device, dtype)
        return transformer(img, ids, txt, text_ids(1, txt.shape[1], device=device), t_vec, c["y"].to(device, dtype),
                           guidance_vec, c["txt_mask"].to(device) if mask_on else None)

    schedule = flux_schedule(steps, img.shape[1], shift=True)
    for i, (t_curr, t_prev) in enumerate(zip(schedule[:-1], schedule[1:])):
        t_vec = torch.full((1,), t_curr, device=device, dtype=dtype)
        pred = velocity(cond, t_vec)
        if negative is not None:
            uncond = velocity(negative, t_vec)
            pred = uncond + cfg_scale * (pred - uncond)
        img = img + (t_prev - t_curr) * pred
        if on_step is not None:
            on_step(i, t_curr)
    latents = family.unscale_latents(unpack_latents(img.float(), latent_h, latent_w))
    decoded = vae.decode(latents.to(vae.device, vae.dtype)).sample
    array = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
