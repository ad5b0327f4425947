"""FLUX.1's latent layout: 16-channel VAE latents packed into 2x2 patches (64 features per token), and the
position ids the transformer's rotary embedding reads (axis 0 unused by FLUX.1, axes 1 and 2 the patch's row and
column; text tokens all at 0)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["image_ids", "pack_latents", "text_ids", "unpack_latents"]


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), C*4]``: each 2x2 patch one token, features ordered (c, ph, pw)."""
    batch, channels, height, width = latents.shape
    x = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width`` (latent pixels)."""
    batch, _, features = tokens.shape
    channels = features // 4
    x = tokens.view(batch, height // 2, width // 2, channels, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``[B, (H/2)(W/2), 3]`` position ids of packed latents of ``height`` x ``width`` latent pixels."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None, dtype=torch.float32) -> Tensor:
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
