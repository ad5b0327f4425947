"""Kohya's LoRA / LoCon network object: :class:`LoRANetwork` holds the modules :func:`sd_scripts.networks.lora.create_network`
built, applies and removes them, writes and loads kohya's state dict, scales weight norms and gives the optimizer its
parameter groups (:func:`build_param_groups`, shared with the LyCORIS adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.block_weights import BlockSettings
from sd_scripts.networks.lora_modules import AdapterModule, LoRAModule, max_norm_ratio

__all__ = ["LoRANetwork", "LoadResult", "build_param_groups"]


@dataclass
class LoadResult:
    """What :meth:`LoRANetwork.load_kohya_state_dict` could not match (canonical module names)."""

    missing: list[str] = field(default_factory=list)  # network modules the file has no weights for
    unexpected: list[str] = field(default_factory=list)  # file modules / keys the network does not have


class LoRANetwork(nn.Module):
    """The LoRA modules of a UNet and its text encoders, registered under their kohya names, so
    ``state_dict()`` has exactly kohya's keys."""

    def __init__(self, unet_loras: Sequence[AdapterModule], text_encoder_loras: Sequence[AdapterModule],
                 te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), multiplier: float = 1.0,
                 blocks: BlockSettings | None = None, loraplus_lr_ratio: float | None = None,
                 loraplus_unet_lr_ratio: float | None = None, loraplus_text_encoder_lr_ratio: float | None = None):
        super().__init__()
        self.unet_loras = list(unet_loras)
        self.text_encoder_loras = list(text_encoder_loras)
        self.te_prefixes = tuple(te_prefixes)
        self.multiplier = multiplier
        # Per-block learning rates (kohya down/mid/up_lr_weight); None = one UNet group.
        self.blocks = blocks
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicated LoRA name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    # ---- access
    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def lora_by_name(self) -> dict[str, LoRAModule]:
        return {lora.lora_name: lora for lora in self.loras}

    @property
    def applied(self) -> bool:
        return any(lora.applied for lora in self.loras)

    # ---- patching
    def apply_to(self) -> None:
        for lora in self.loras:
            lora.apply_to()

    def remove(self) -> None:
        for lora in self.loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """Add every module's ``multiplier * up @ down * alpha/dim`` into the original weights
        (for inference; the network must not be applied at the same time)."""
        if self.applied:
            raise RuntimeError("remove() the network before merging it into the model")
        m = self.multiplier if multiplier is None else multiplier
        for lora in self.loras:
            weight = lora.org_module.weight
            weight += (lora.delta_weight() * m).to(weight.device, weight.dtype)

    def supports_max_norm(self) -> bool:
        """kohya's ``scale_weight_norms`` works for every LoRA/LoCon/DyLoRA module."""
        return True

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """kohya's ``scale_weight_norms``: every module whose delta ``up @ down * alpha/dim`` has a Frobenius
        norm above ``max_norm_value`` gets both factors multiplied by ``sqrt(ratio)``, so the norm becomes the
        limit. Returns ``(keys_scaled, mean norm, max norm)`` of the norms after scaling (kohya's logs).

        All ratios are computed before one transfer to the CPU; factors of modules within the limit are
        multiplied by exactly 1, so they are unchanged."""
        norms, ratios = [], []
        for lora in self.loras:
            norm = lora.delta_weight().norm()
            ratio = max_norm_ratio(norm, max_norm_value)
            root = ratio.sqrt()
            for param in lora.parameters():
                param.mul_(root.to(param.device))
            norms.append(norm * ratio)
            ratios.append(ratio)
        if not norms:
            return 0, 0.0, 0.0
        scaled = torch.stack(norms).float().cpu()
        keys_scaled = int((torch.stack(ratios).cpu() != 1).sum())
        return keys_scaled, float(scaled.mean()), float(scaled.max())

    # ---- optimizer
    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Kohya's parameter groups: text encoder(s) at ``text_encoder_lr`` (or ``default_lr``), UNet at
        ``unet_lr`` (or ``default_lr``). With block lr weights the UNet gets one group per block at
        ``unet_lr x weight`` (names ``unet_block<slot>``, as kohya); with LoRA+ ratios the ``lora_up``
        weights get their own group at ``lr x ratio`` (name + ``" plus"``). Groups whose lr is 0 or
        None are left out and their parameters stop requiring grad. Returns ``(param_groups,
        group_names)``; names are ``"textencoder"`` (``"textencoder1"``, ``"textencoder2"`` with two
        text encoders) and ``"unet"``."""
        self.requires_grad_(True)
        return build_param_groups(
            self.text_encoder_loras, self.unet_loras, self.te_prefixes, text_encoder_lr, unet_lr, default_lr,
            blocks=self.blocks, te_plus_ratio=self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
            unet_plus_ratio=self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio)

    # ---- state dict
    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """``{<name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha}`` for every module (detached)."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.loras:
            out.update(lora.kohya_tensors())
        return out

    @torch.no_grad()
    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = False,
                              setting: str = "network_weights") -> LoadResult:
        """Load a kohya LoRA state dict (either text-encoder spelling) into this network.

        A module's alpha comes from the file (missing alpha = rank, as every loader reads it).
        Ranks that differ from the network, or non-LoRA parts (LyCORIS), raise
        :class:`ConfigError` naming ``setting``; with ``strict`` so do missing or extra modules."""
        parsed = lora_keys.group_by_module(state_dict)
        by_name = self.lora_by_name()
        result = LoadResult(missing=[n for n in by_name if n not in parsed.modules],
                            unexpected=[n for n in parsed.modules if n not in by_name] + list(parsed.other_keys))
        for name, parts in parsed.modules.items():
            lora = by_name.get(name)
            if lora is None:
                continue
            extra = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"})
            if extra or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                what = f"has {extra[0]}" if extra else "lacks lora_down/lora_up weights"
                raise ConfigError(f"{setting}: module {name} {what}, so the file is not a plain LoRA/LoCon; "
                                  "pick a kohya LoRA file or the matching network type", setting=setting)
            alpha = parts.get("alpha")
            lora.load_kohya_tensors(parts["lora_down.weight"], parts["lora_up.weight"],
                                    None if alpha is None else float(alpha.float().item()), setting)
        if strict and (result.missing or result.unexpected):
            if result.unexpected:
                detail = f"has {len(result.unexpected)} modules this network lacks (e.g. {result.unexpected[0]})"
            else:
                detail = f"lacks {len(result.missing)} modules of this network (e.g. {result.missing[0]})"
            raise ConfigError(f"{setting}: the file {detail}; use a LoRA trained for this model with the same "
                              "network settings, or turn on dim_from_weights", setting=setting)
        return result


def build_param_groups(text_encoder_loras: Sequence[nn.Module], unet_loras: Sequence[nn.Module],
                       te_prefixes: Sequence[str], text_encoder_lr: float | Sequence[float] | None,
                       unet_lr: float | None, default_lr: float | None, *, blocks: BlockSettings | None = None,
                       te_plus_ratio: float | None = None, unet_plus_ratio: float | None = None,
                       ) -> tuple[list[dict[str, Any]], list[str]]:
    """kohya's optimizer groups over adapter modules (anything with ``lora_name`` and parameters).

    Text encoder(s) at ``text_encoder_lr`` (or ``default_lr``; a list gives one lr per text encoder),
    UNet at ``unet_lr`` (or ``default_lr``). With block lr weights the UNet gets one group per block
    at ``unet_lr x weight`` (``unet_block<slot>``); with a LoRA+ ratio the ``lora_up`` weights get
    their own group at ``lr x ratio`` (name + ``" plus"``). Groups whose lr is 0 or None are left
    out and their parameters stop requiring grad."""
    groups: list[dict[str, Any]] = []
    names: list[str] = []

    def add(loras: Sequence[nn.Module], lr: float | None, name: str, plus_ratio: float | None) -> None:
        plain: list[nn.Parameter] = []
        plus: list[nn.Parameter] = []
        for lora in loras:
            for param_name, p in lora.named_parameters():
                is_up = param_name.startswith(("lora_up", "lora_B"))
                (plus if plus_ratio is not None and is_up else plain).append(p)
        for params, group_lr, group_name in ((plain, lr, name),
                                             (plus, None if lr is None else lr * (plus_ratio or 1.0), name + " plus")):
            if not params:
                continue
            if group_lr is None or group_lr == 0:
                for p in params:
                    p.requires_grad_(False)
                continue
            groups.append({"params": params, "lr": group_lr})
            names.append(group_name)

    te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
    te_lrs = [default_lr if lr is None else lr for lr in (te_lrs or [None])]
    te_prefixes = tuple(te_prefixes)
    if len(te_prefixes) <= 1:
        add(text_encoder_loras, te_lrs[0], "textencoder", te_plus_ratio)
    else:
        for i, prefix in enumerate(te_prefixes):
            loras = [lora for lora in text_encoder_loras if lora_keys.prefix_of(lora.lora_name) == prefix]
            add(loras, te_lrs[i] if i < len(te_lrs) else te_lrs[0], f"textencoder{i + 1}", te_plus_ratio)

    base_unet_lr = default_lr if unet_lr is None else unet_lr
    if blocks is not None and blocks.lr_weight is not None:
        by_block: dict[int | None, list[nn.Module]] = {}
        for lora in unet_loras:
            by_block.setdefault(blocks.block_index(lora.lora_name), []).append(lora)
        for idx in sorted(by_block, key=lambda i: -1 if i is None else i):
            weight = 1.0 if idx is None else blocks.lr_weight[idx]
            lr = None if base_unet_lr is None else base_unet_lr * weight
            add(by_block[idx], lr, BlockSettings.group_name(idx), unet_plus_ratio)
    else:
        add(unet_loras, base_unet_lr, "unet", unet_plus_ratio)
    return groups, names
