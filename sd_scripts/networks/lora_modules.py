"""The modules of kohya's LoRA / LoCon network: :class:`AdapterModule` (patches the ``forward`` of the layer it adapts
and puts it back) and :class:`LoRAModule` (``y = org(x) + up(drop(down(x))) * multiplier * alpha/dim``), with the
tensor math they share with the tools.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError

__all__ = ["AdapterModule", "LoRAModule", "lora_delta_weight", "max_norm_ratio"]


# --------------------------------------------------------------------------- tensor math

def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight change of one LoRA module: ``up @ down * scale`` shaped like the original weight.

    Linear: down ``[r, in]``, up ``[out, r]`` -> ``[out, in]``. Conv: down ``[r, in, kh, kw]``,
    up ``[out, r, 1, 1]`` -> ``[out, in, kh, kw]`` (for k x k this equals kohya's
    ``conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)``)."""
    up2 = up.reshape(up.shape[0], -1)
    down2 = down.reshape(down.shape[0], -1)
    return (up2 @ down2).reshape(up.shape[0], *down.shape[1:]) * scale


def max_norm_ratio(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """kohya's max-norm factor for a delta of Frobenius norm ``norm``: ``min(n, max) / n`` with
    ``n = max(norm, max / 2)`` (1 when the norm is within the limit; the clamp keeps a zero delta at 1)."""
    clamped = norm.clamp(min=max_norm / 2)
    return clamped.clamp(max=max_norm) / clamped


# --------------------------------------------------------------------------- modules

class AdapterModule(nn.Module):
    """Base of the adapters here: patches the ``forward`` of the layer it adapts.

    The adapted layer is kept outside the module tree (not in the state dict, not moved by
    ``.to()``); :meth:`apply_to` routes the layer's forward through :meth:`forward` (which calls
    ``self.org_forward``) and :meth:`remove` gives the layer its own forward back."""

    def __init__(self, lora_name: str, org_module: nn.Module):
        super().__init__()
        self.lora_name = lora_name
        object.__setattr__(self, "org_module", org_module)
        self.org_forward = None
        self._saved_forward: tuple[bool, Any] | None = None

    @property
    def applied(self) -> bool:
        return self._saved_forward is not None

    def apply_to(self) -> None:
        """Route the original layer's forward through this module (idempotent)."""
        if self.applied:
            return
        org = self.org_module
        self._saved_forward = ("forward" in org.__dict__, org.__dict__.get("forward"))
        self.org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        """Give the original layer its own forward back."""
        if not self.applied:
            return
        had_own, previous = self._saved_forward
        org = self.org_module
        if had_own:
            org.forward = previous
        else:
            org.__dict__.pop("forward", None)
        self._saved_forward = None
        self.org_forward = None

    # ---- the kohya file view (subclasses implement)
    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<name>.lora_down.weight", "<name>.lora_up.weight", "<name>.alpha"}`` (detached)."""
        raise NotImplementedError

    def load_kohya_tensors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None, setting: str) -> None:
        """Copy a file's ``lora_down`` / ``lora_up`` / alpha into this module; a shape that differs
        raises ConfigError naming ``setting``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_shape(self, tensor: torch.Tensor, expected: tuple[int, ...], label: str, setting: str) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise ConfigError(
                f"{setting}: {self.lora_name}.{label} has shape {tuple(tensor.shape)} but the network expects "
                f"{tuple(expected)}; turn on dim_from_weights or set network_dim/conv_dim to the file's rank",
                setting=setting)


class LoRAModule(AdapterModule):
    """One LoRA (or LoCon) adapter around a ``Linear`` or ``Conv2d``.

    Parameters: ``lora_down`` (kaiming-uniform init, like ``nn.Linear``) and ``lora_up`` (zeros), so
    the adapted layer equals the original at start; buffer ``alpha`` (0-dim float32)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(lora_name, org_module)
        self.lora_dim = int(lora_dim)
        weight = org_module.weight
        device = weight.device
        if isinstance(org_module, nn.Conv2d):
            if org_module.groups != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size, org_module.stride,
                                       org_module.padding, dilation=org_module.dilation, bias=False,
                                       padding_mode=org_module.padding_mode, device=device)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False, device=device)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False, device=device)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False, device=device)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d, got {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().cpu().item())
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.scale = alpha / self.lora_dim

        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        n = self.lora_name
        return {f"{n}.lora_down.weight": self.lora_down.weight.detach(),
                f"{n}.lora_up.weight": self.lora_up.weight.detach(), f"{n}.alpha": self.alpha.detach()}

    @torch.no_grad()
    def load_kohya_tensors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None, setting: str) -> None:
        self._check_shape(down, self.lora_down.weight.shape, "lora_down", setting)
        self._check_shape(up, self.lora_up.weight.shape, "lora_up", setting)
        self.lora_down.weight.copy_(down.to(self.lora_down.weight.dtype))
        self.lora_up.weight.copy_(up.to(self.lora_up.weight.dtype))
        self.set_alpha(alpha)

    def set_alpha(self, alpha: float | None) -> None:
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        with torch.no_grad():
            self.alpha.fill_(alpha)
        self.scale = alpha / self.lora_dim

    # ---- math
    def delta_weight(self) -> torch.Tensor:
        """``up @ down * alpha/dim`` shaped like the original weight (float32, no multiplier)."""
        return lora_delta_weight(self.lora_down.weight.float(), self.lora_up.weight.float(), self.scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org = self.org_forward(x, *args, **kwargs)
        if self.module_dropout is not None and self.training and torch.rand(()) < self.module_dropout:
            return org

        lora_dtype = self.lora_down.weight.dtype
        if x.dtype != lora_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_dtype)
        lx = self.lora_down(x)

        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)

        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # [B, 1, r]: Linear on tokens
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)  # [B, r, 1, 1]: conv
            lx = lx * mask.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)

        out = self.lora_up(lx) * (self.multiplier * scale)
        if out.dtype != org.dtype:
            out = out.to(org.dtype)
        return org + out

    def extra_repr(self) -> str:
        return f"dim={self.lora_dim}, alpha={self.scale * self.lora_dim:g}"
