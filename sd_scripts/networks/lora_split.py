"""kohya's ``split_qkv`` (FLUX.1): a fused projection (``img_attn.qkv``, a single block's ``linear1``) trained as one
LoRA per output part (q, k, v and the MLP input), each of rank ``dim``.

The file keeps kohya's fused layout, so every loader reads it as a plain LoRA of rank ``parts x dim``: ``lora_down``
stacks the parts' down weights, ``lora_up`` is block-diagonal (part j's up weight in its rows and columns). kohya
writes the training alpha unchanged, which makes loaders apply the delta at ``1/parts`` of its trained strength;
here alpha is written as ``parts x alpha``, so ``alpha / rank`` in the file equals the trained scale and the file
gives exactly the trained delta (and loading it back splits it again).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks.lora import LoRAModule

__all__ = ["SplitLoRAModule"]


class SplitLoRAModule(LoRAModule):
    def __init__(self, lora_name: str, org_module: nn.Module, split_dims: list[int], multiplier: float = 1.0,
                 lora_dim: int = 4, alpha=1.0, dropout=None, rank_dropout=None, module_dropout=None):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        if sum(split_dims) != org_module.out_features:
            raise ValueError(f"{lora_name}: split {split_dims} does not add up to {org_module.out_features}")
        self.split_dims = list(split_dims)
        device = org_module.weight.device
        del self.lora_down, self.lora_up
        self.lora_downs = nn.ModuleList(nn.Linear(org_module.in_features, self.lora_dim, bias=False, device=device)
                                        for _ in split_dims)
        self.lora_ups = nn.ModuleList(nn.Linear(self.lora_dim, size, bias=False, device=device) for size in split_dims)
        for down, up in zip(self.lora_downs, self.lora_ups):
            nn.init.kaiming_uniform_(down.weight, a=5 ** 0.5)
            nn.init.zeros_(up.weight)

    # ---- the fused file view
    def _fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.cat([d.weight for d in self.lora_downs], dim=0)
        up = torch.zeros(sum(self.split_dims), down.shape[0], dtype=down.dtype, device=down.device)
        row = 0
        for j, (size, part) in enumerate(zip(self.split_dims, self.lora_ups)):
            up[row:row + size, j * self.lora_dim:(j + 1) * self.lora_dim] = part.weight
            row += size
        return down, up

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        down, up = self._fused()
        n = self.lora_name
        parts = len(self.split_dims)
        return {f"{n}.lora_down.weight": down.detach(), f"{n}.lora_up.weight": up.detach(),
                f"{n}.alpha": (self.alpha * parts).detach()}

    @torch.no_grad()
    def load_kohya_tensors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None, setting: str) -> None:
        parts = len(self.split_dims)
        self._check_shape(down, (parts * self.lora_dim, self.lora_downs[0].in_features), "lora_down", setting)
        self._check_shape(up, (sum(self.split_dims), parts * self.lora_dim), "lora_up", setting)
        if not self._is_block_diagonal(up):
            raise ConfigError(f"{setting}: module {self.lora_name} has a lora_up that mixes q, k, v (not "
                              "block-diagonal), so the file was not trained with split_qkv; turn split_qkv off in "
                              "network_args to load it", setting=setting)
        row = 0
        for j, size in enumerate(self.split_dims):
            cols = slice(j * self.lora_dim, (j + 1) * self.lora_dim)
            self.lora_downs[j].weight.copy_(down[cols].to(self.lora_downs[j].weight.dtype))
            self.lora_ups[j].weight.copy_(up[row:row + size, cols].to(self.lora_ups[j].weight.dtype))
            row += size
        self.set_alpha(None if alpha is None else float(alpha) / parts)

    def _is_block_diagonal(self, up: torch.Tensor) -> bool:
        """True when part j's rows of the fused ``up`` use only part j's columns (as this module writes it)."""
        mask = torch.ones(up.shape, dtype=torch.bool, device=up.device)
        row = 0
        for j, size in enumerate(self.split_dims):
            mask[row:row + size, j * self.lora_dim:(j + 1) * self.lora_dim] = False
            row += size
        return not bool(up[mask].any())

    def delta_weight(self) -> torch.Tensor:
        down, up = self._fused()
        return (up.float() @ down.float()) * self.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org = self.org_forward(x, *args, **kwargs)
        if self.module_dropout is not None and self.training and torch.rand(()) < self.module_dropout:
            return org
        lora_dtype = self.lora_downs[0].weight.dtype
        if x.dtype != lora_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_dtype)
        outs = []
        scale = self.scale
        for down, up in zip(self.lora_downs, self.lora_ups):
            lx = down(x)
            if self.dropout is not None and self.training:
                lx = torch.nn.functional.dropout(lx, p=self.dropout)
            if self.rank_dropout is not None and self.training:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                lx = lx * (mask.unsqueeze(1) if lx.dim() == 3 else mask).to(lx.dtype) / (1.0 - self.rank_dropout)
            outs.append(up(lx))
        out = torch.cat(outs, dim=-1) * (self.multiplier * scale)
        return org + out.to(org.dtype)
