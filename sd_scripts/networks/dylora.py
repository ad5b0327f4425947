"""kohya's DyLoRA (``network_module = networks.dylora``, ``network_args unit=N``).

Same targets, key names and file layout as :mod:`sd_scripts.networks.lora`; only training differs
(kohya ``networks/dylora.py``):

* Every rank row/column is its own parameter (``lora_A[i]`` ``[1, in(, kh, kw)]``, ``lora_B[i]``
  ``[out, 1(, 1, 1)]``). At each training forward a random slice ``[b, b + unit)`` (``b`` a multiple
  of ``unit``) is the only one that requires grad, so the optimizer leaves the other ranks alone
  that step (their grads stay None).
* The forward uses all ranks, scaled by ``alpha/dim * sqrt(dim / (b + unit))`` so that the low ranks
  learn to carry the LoRA on their own; any leading sub-rank of the saved file is a usable LoRA
  (cut it with a resize tool).
* The saved file is a plain full-rank LoRA: ``lora_down`` = the ``lora_A`` rows stacked,
  ``lora_up`` = the ``lora_B`` columns side by side, ``alpha``.

Differences from kohya, all where kohya's choice is a slip: outside training (sampling) the
forward uses the full rank with ``alpha/dim`` (kohya keeps drawing random ranks, so its samples do
not match the saved file); the multiplier applies (kohya ignores it); ``conv_alpha`` applies to
3x3 convs (kohya uses ``network_alpha``). ``conv_dim`` must equal ``network_dim`` (as kohya), and
dropout is not supported (as kohya).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks.lora import AdapterModule, LoRANetwork, create_network, lora_delta_weight

__all__ = ["DyLoRAModule", "DyLoRANetwork", "create_dylora_network"]


class DyLoRAModule(AdapterModule):
    """A DyLoRA adapter around a ``Linear`` or ``Conv2d`` (see the module docstring)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, unit: int = 1, **_unused: Any):
        super().__init__(lora_name, org_module)
        self.lora_dim = int(lora_dim)
        self.unit = int(unit)
        if self.unit < 1 or self.lora_dim % self.unit:
            raise ConfigError(f"network_args: unit={unit} must divide the rank {lora_dim} of {lora_name}; "
                              "pick a unit that divides network_dim", setting="network_args")
        device = org_module.weight.device
        if isinstance(org_module, nn.Conv2d):
            if org_module.groups != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            a_shape = (1, org_module.in_channels, *org_module.kernel_size)
            b_shape = (org_module.out_channels, 1, 1, 1)
            self._conv = dict(stride=org_module.stride, padding=org_module.padding, dilation=org_module.dilation)
            if org_module.padding_mode != "zeros":
                raise ValueError(f"{lora_name}: padding mode {org_module.padding_mode} is not supported")
        elif isinstance(org_module, nn.Linear):
            a_shape = (1, org_module.in_features)
            b_shape = (org_module.out_features, 1)
            self._conv = None
        else:
            raise TypeError(f"{lora_name}: DyLoRA needs a Linear or Conv2d, got {type(org_module).__name__}")
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(a_shape, device=device)) for _ in range(self.lora_dim)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b_shape, device=device)) for _ in range(self.lora_dim)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().cpu().item())
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.scale = alpha / self.lora_dim
        self.multiplier = multiplier
        self.frozen = False  # set by the network when this module's optimizer group has lr 0
        self.last_rank: int | None = None  # b of the last training forward (for tests)

    # ---- weights
    def down_weight(self) -> torch.Tensor:
        return torch.cat(tuple(self.lora_A), dim=0)

    def up_weight(self) -> torch.Tensor:
        return torch.cat(tuple(self.lora_B), dim=1)

    def set_alpha(self, alpha: float | None) -> None:
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        with torch.no_grad():
            self.alpha.fill_(alpha)
        self.scale = alpha / self.lora_dim

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(self.down_weight().float(), self.up_weight().float(), self.scale)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        n = self.lora_name
        return {f"{n}.lora_down.weight": self.down_weight().detach(), f"{n}.lora_up.weight": self.up_weight().detach(),
                f"{n}.alpha": self.alpha.detach()}

    @torch.no_grad()
    def load_kohya_tensors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None, setting: str) -> None:
        self._check_shape(down, (self.lora_dim, *self.lora_A[0].shape[1:]), "lora_down", setting)
        self._check_shape(up, (self.lora_B[0].shape[0], self.lora_dim, *self.lora_B[0].shape[2:]), "lora_up", setting)
        for i in range(self.lora_dim):
            self.lora_A[i].copy_(down[i : i + 1].to(self.lora_A[i].dtype))
            self.lora_B[i].copy_(up[:, i : i + 1].to(self.lora_B[i].dtype))
        self.set_alpha(alpha)

    # ---- forward
    def _pick_rank(self) -> int:
        b = random.randint(0, self.lora_dim - 1)
        b -= b % self.unit
        if not self.frozen:
            for i in range(self.lora_dim):
                trainable = b <= i < b + self.unit
                self.lora_A[i].requires_grad_(trainable)
                self.lora_B[i].requires_grad_(trainable)
        self.last_rank = b
        return b

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org = self.org_forward(x, *args, **kwargs)
        if self.training:
            b = self._pick_rank()
            scale = self.scale * math.sqrt(self.lora_dim / (b + self.unit))
        else:
            scale = self.scale
        down, up = self.down_weight(), self.up_weight()
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self._conv is not None:
            lx = torch.nn.functional.conv2d(x, down, **self._conv)
            lx = torch.nn.functional.conv2d(lx, up)
        else:
            lx = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        out = lx * (self.multiplier * scale)
        if out.dtype != org.dtype:
            out = out.to(org.dtype)
        return org + out

    def extra_repr(self) -> str:
        return f"dim={self.lora_dim}, unit={self.unit}, alpha={self.scale * self.lora_dim:g}"


class DyLoRANetwork(LoRANetwork):
    """:class:`LoRANetwork` of :class:`DyLoRAModule`; modules whose group has lr 0 stay frozen."""

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        groups, names = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        trained = {id(p) for group in groups for p in group["params"]}
        for lora in self.loras:
            lora.frozen = not any(id(p) in trained for p in lora.parameters())
        return groups, names


def create_dylora_network(unet: nn.Module | None, text_encoders: Any, *, network_dim: int | None = 4,
                          network_alpha: float | None = 1.0, unit: int | None = 1, conv_dim: int | None = None,
                          conv_alpha: float | None = None, train_unet: bool = True, train_text_encoder: bool = True,
                          te_prefixes: Sequence[str] = ("lora_te",), multiplier: float = 1.0,
                          module_dims=None, weights_sd=None, unet_path_map=None, **loraplus: Any) -> DyLoRANetwork:
    """kohya's DyLoRA network (not yet applied). ``unit`` (default 1) must divide every rank;
    ``conv_dim`` (3x3 convs, LoCon) must equal ``network_dim`` as in kohya."""
    network_dim = 4 if network_dim is None else int(network_dim)
    unit = 1 if unit is None else int(unit)
    if unit < 1:
        raise ConfigError(f"network_args: unit={unit} must be 1 or more", setting="network_args")
    if network_dim % unit:
        raise ConfigError(f"network_args: unit={unit} must divide network_dim {network_dim}; pick a unit that "
                          f"divides it (e.g. unit=1 or unit={math.gcd(network_dim, unit) or 1})", setting="network_args")
    if conv_dim is not None and int(conv_dim) != network_dim:
        raise ConfigError(f"network_args: conv_dim={conv_dim} must equal network_dim {network_dim} for DyLoRA "
                          "(as kohya); set them to the same value", setting="network_args")

    def factory(name, layer, multiplier=1.0, lora_dim=4, alpha=1.0, **_):
        return DyLoRAModule(name, layer, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha, unit=unit)

    return create_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                          conv_dim=conv_dim, conv_alpha=conv_alpha, train_unet=train_unet,
                          train_text_encoder=train_text_encoder, te_prefixes=te_prefixes, multiplier=multiplier,
                          module_dims=module_dims, weights_sd=weights_sd, unet_path_map=unet_path_map,
                          module_factory=factory, network_class=DyLoRANetwork, **loraplus)
