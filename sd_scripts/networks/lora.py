"""Kohya's LoRA / LoCon network for SD1/SD2 (diffusers UNet, transformers CLIP text encoders).

The network does not copy or replace the model's layers: each :class:`LoRAModule` patches the
``forward`` of the layer it adapts (``y = org(x) + up(drop(down(x))) * multiplier * alpha/dim``),
and :meth:`LoRANetwork.remove` puts the original forward back. Module names and the state dict
are exactly kohya's (see :mod:`sd_scripts.files.lora_keys`).

Targets (kohya ``networks/lora.py``):

* UNet: every ``Linear`` and ``Conv2d`` inside a ``Transformer2DModel``; with ``conv_dim`` also inside
  ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` (LoCon): k x k convs get ``conv_dim/conv_alpha``,
  Linear and 1x1 convs get ``network_dim/network_alpha``.
* Text encoder: every ``Linear`` inside the CLIP attention (whatever the installed transformers calls
  that class) and ``CLIPMLP``.

SD1.5: 192 UNet modules (278 with conv_dim) and 72 text-encoder modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.block_weights import BlockSettings
from sd_scripts.files.lora_keys import PREFIX_UNET
from sd_scripts.networks.network_args import parse_float, parse_int, split_network_args

__all__ = [
    "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_MODULE_CONV2D_3X3", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "NETWORK_ARG_TYPES", "AdapterModule", "LoRAModule", "LoRANetwork", "LoadResult", "create_network", "create_network_from_weights",
    "build_param_groups", "dims_from_state_dict", "lora_delta_weight", "max_norm_ratio", "parse_network_args",
    "split_network_args",
]

UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers has called its CLIP attention CLIPAttention, CLIPSdpaAttention and
# CLIPFlashAttention2 over time; subclasses of any of these match too (see _class_names).
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")

# network_args keys this network understands, with their value types.
NETWORK_ARG_TYPES: dict[str, type] = {
    "conv_dim": int,
    "conv_alpha": float,
    "dropout": float,
    "rank_dropout": float,
    "module_dropout": float,
    "loraplus_lr_ratio": float,
    "loraplus_unet_lr_ratio": float,
    "loraplus_text_encoder_lr_ratio": float,
}


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


# --------------------------------------------------------------------------- network_args

def _parse_number(key: str, value: Any, kind: type) -> Any:
    if kind is int:
        return parse_int(key, value)
    return parse_float(key, value, example="0.1")


def parse_network_args(network_args: Sequence[str] | Mapping[str, Any] | str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse kohya ``network_args`` for this network.

    Returns ``(known, unknown)``: ``known`` holds the keys of :data:`NETWORK_ARG_TYPES` as numbers
    (or None), ``unknown`` the other keys verbatim so the caller can warn about them.
    A bad value raises :class:`ConfigError` naming ``network_args`` and the key."""
    raw = split_network_args(network_args)
    known: dict[str, Any] = {}
    unknown: dict[str, str] = {}
    for key, value in raw.items():
        kind = NETWORK_ARG_TYPES.get(key)
        if kind is None:
            unknown[key] = value
        else:
            known[key] = _parse_number(key, value, kind)
    return known, unknown


# --------------------------------------------------------------------------- module

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


# --------------------------------------------------------------------------- network

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


# --------------------------------------------------------------------------- construction

def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _find_targets(root: nn.Module, prefix: str, target_classes: Sequence[str],
                  path_map: Callable[[str], str] | None = None) -> list[tuple[str, nn.Module]]:
    """``[(kohya name, layer)]`` for every Linear/Conv2d inside a module of one of ``target_classes``.

    ``path_map`` turns a module path into the path the file names it by (SDXL: the SGM UNet layout)."""
    targets = set(target_classes)
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for path, module in root.named_modules():
        if not (_class_names(module) & targets):
            continue
        for child_path, child in module.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or id(child) in seen:
                continue
            seen.add(id(child))
            full = f"{path}.{child_path}" if path and child_path else (path or child_path)
            found.append((lora_keys.lora_name(prefix, path_map(full) if path_map else full), child))
    return found


def _check_int(name: str, value: Any, minimum: int, setting: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise ConfigError(f"{setting}: {name} must be a whole number of at least {minimum} (got {value!r})", setting=setting)
    return int(number)


def _check_float(name: str, value: Any, setting: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{setting}: {name} must be a number (got {value!r})", setting=setting)
    return number


def _check_probability(name: str, value: Any, setting: str) -> float | None:
    if value is None:
        return None
    number = _check_float(name, value, setting)
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"{setting}: {name} must be at least 0 and below 1 (got {value!r})", setting=setting)
    return number or None


def _as_list(text_encoders: Any) -> list[nn.Module]:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        return [text_encoders]
    return [te for te in text_encoders]


def create_network(unet: nn.Module | None, text_encoders: nn.Module | Sequence[nn.Module] | None, *,
                   network_dim: int | None = 4, network_alpha: float | None = 1.0,
                   conv_dim: int | None = None, conv_alpha: float | None = None,
                   dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                   train_unet: bool = True, train_text_encoder: bool = True,
                   te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), multiplier: float = 1.0,
                   module_dims: Mapping[str, tuple[int, float]] | None = None,
                   weights_sd: Mapping[str, torch.Tensor] | None = None,
                   unet_path_map: Callable[[str], str] | None = None,
                   blocks: BlockSettings | None = None, loraplus_lr_ratio: float | None = None,
                   loraplus_unet_lr_ratio: float | None = None,
                   loraplus_text_encoder_lr_ratio: float | None = None,
                   module_factory: Callable[..., AdapterModule] | None = None,
                   network_class: type[LoRANetwork] | None = None, targets: Any = None) -> LoRANetwork:
    """Build kohya's LoRA network (not yet applied: call :meth:`LoRANetwork.apply_to`).

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0, ``conv_alpha`` None means 1.0
    when ``conv_dim`` is set; an alpha of 0 means alpha = dim. ``module_dims``
    (``{kohya name: (rank, alpha)}``, see :func:`dims_from_state_dict`) builds exactly the modules of
    a file, with its ranks (``dim_from_weights``); a module the model lacks raises ConfigError
    naming ``network_weights``. ``weights_sd`` (a kohya state dict) does the same with the file's
    ranks and also loads its weights. ``unet_path_map`` (``ModelFamily.lora_unet_path_map``) names
    UNet modules by another layout (SDXL files use the SGM UNet's paths).

    ``blocks`` (:func:`sd_scripts.networks.block_weights.resolve_block_settings`) gives UNet modules
    per-block ranks/alphas (``block_dims``...; a rank of 0 leaves the module out) and per-block
    learning-rate weights; with ``module_dims`` only its learning-rate weights apply. The
    ``loraplus_*`` ratios give the ``lora_up`` weights their own optimizer group at lr x ratio.
    ``module_factory(name, layer, multiplier=, lora_dim=, alpha=, dropout=, rank_dropout=,
    module_dropout=)`` and ``network_class`` build another kind of module and network on the same
    targets (DyLoRA). ``targets`` (``ModelFamily.lora_targets``) replaces kohya's SD target classes (FLUX.1:
    the double/single blocks, CLIP-L and T5) and gives per-module-type ranks (``dim_for``)."""
    plus = dict(loraplus_lr_ratio=loraplus_lr_ratio, loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio)
    if weights_sd is not None:
        network = create_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                                 conv_dim=conv_dim, conv_alpha=conv_alpha, dropout=dropout, rank_dropout=rank_dropout,
                                 module_dropout=module_dropout, train_unet=train_unet,
                                 train_text_encoder=train_text_encoder, te_prefixes=te_prefixes, multiplier=multiplier,
                                 module_dims=dims_from_state_dict(weights_sd), unet_path_map=unet_path_map,
                                 blocks=blocks, module_factory=module_factory, network_class=network_class,
                                 targets=targets, **plus)
        network.load_kohya_state_dict(weights_sd, strict=False)
        return network
    network_dim = 4 if network_dim is None else _check_int("network_dim", network_dim, 1, "network_dim")
    network_alpha = 1.0 if network_alpha is None else _check_float("network_alpha", network_alpha, "network_alpha")
    if conv_dim is not None:
        conv_dim = _check_int("conv_dim", conv_dim, 0, "network_args") or None
    conv_alpha = 1.0 if conv_alpha is None else _check_float("conv_alpha", conv_alpha, "network_args")
    dropout = _check_probability("network_dropout", dropout, "network_dropout")
    rank_dropout = _check_probability("rank_dropout", rank_dropout, "network_args")
    module_dropout = _check_probability("module_dropout", module_dropout, "network_args")

    tes = _as_list(text_encoders)
    te_prefixes = tuple(te_prefixes)
    if train_text_encoder and tes and len(tes) != len(te_prefixes):
        raise ValueError(f"{len(tes)} text encoders but te_prefixes {te_prefixes}")

    for key, ratio in plus.items():
        if ratio is not None:
            plus[key] = _check_float(key, ratio, "network_args")
            if plus[key] <= 0:
                raise ConfigError(f"network_args: {key}={ratio} must be above 0", setting="network_args")
    use_blocks = blocks is not None and module_dims is None
    with_conv = conv_dim is not None or module_dims is not None or (use_blocks and blocks.has_conv)
    if targets is None:
        unet_classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if with_conv else ())
        te_classes = (TEXT_ENCODER_TARGET_REPLACE_MODULE,) * len(tes)
        dim_for = None
    else:
        unet_classes = tuple(targets.unet_classes) + (tuple(targets.unet_conv_classes) if with_conv else ())
        te_classes = tuple(targets.te_classes)
        dim_for = targets.dim_for

    candidates: list[tuple[str, nn.Module]] = []
    enabled_prefixes: set[str] = set()
    if train_text_encoder:
        for prefix, te, classes in zip(te_prefixes, tes, te_classes):
            enabled_prefixes.add(prefix)
            candidates += _find_targets(te, prefix, classes)
    n_te_candidates = len(candidates)
    if train_unet and unet is not None:
        enabled_prefixes.add(PREFIX_UNET)
        candidates += _find_targets(unet, PREFIX_UNET, unet_classes, unet_path_map)

    if module_dims is not None:
        module_dims = {lora_keys.canonical_lora_name(k): v for k, v in module_dims.items()}
        known = {name for name, _ in candidates}
        absent = [n for n in module_dims if n not in known
                  and (lora_keys.prefix_of(n) in enabled_prefixes or lora_keys.prefix_of(n) not in
                       ({PREFIX_UNET} | set(te_prefixes)))]
        if absent:
            raise ConfigError(
                f"network_weights: {len(absent)} modules of the file are not in this model (e.g. {absent[0]}); "
                "the LoRA was made for another model family or network type", setting="network_weights")

    unet_loras: list[AdapterModule] = []
    te_loras: list[AdapterModule] = []
    for i, (name, layer) in enumerate(candidates):
        is_conv = isinstance(layer, nn.Conv2d)
        is_small = not is_conv or tuple(layer.kernel_size) == (1, 1)
        block = blocks.dim_alpha(name, not is_small) if use_blocks and i >= n_te_candidates else None
        if module_dims is not None:
            if name not in module_dims:
                continue
            dim, alpha = module_dims[name]
        elif block is not None:
            dim, alpha = block
        elif is_small:
            dim, alpha = network_dim, network_alpha
            typed = dim_for(name) if dim_for is not None else None
            if typed is not None:
                dim = typed
        elif conv_dim is not None:
            dim, alpha = conv_dim, conv_alpha
        else:
            continue
        if not dim:
            continue
        lora = (module_factory or LoRAModule)(name, layer, multiplier=multiplier, lora_dim=dim, alpha=alpha,
                                              dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        (te_loras if i < n_te_candidates else unet_loras).append(lora)
    return (network_class or LoRANetwork)(unet_loras, te_loras, te_prefixes=te_prefixes, multiplier=multiplier,
                                          blocks=blocks, **plus)


def dims_from_state_dict(state_dict: Mapping[str, torch.Tensor], setting: str = "network_weights") -> dict[str, tuple[int, float]]:
    """``{kohya name: (rank, alpha)}`` of a LoRA file (missing alpha = rank), for ``dim_from_weights``."""
    parsed = lora_keys.group_by_module(state_dict)
    if not parsed.modules:
        raise ConfigError(f"{setting}: the file has no kohya LoRA modules; pick a LoRA .safetensors file", setting=setting)
    dims: dict[str, tuple[int, float]] = {}
    for name in parsed.modules:
        rank = parsed.rank(name)
        if rank is None:
            raise ConfigError(f"{setting}: module {name} has no lora_down weight, so the file is not a plain "
                              "LoRA/LoCon; pick a kohya LoRA file", setting=setting)
        dims[name] = (rank, parsed.alpha(name))
    return dims


def create_network_from_weights(unet: nn.Module | None, text_encoders: Any, state_dict: Mapping[str, torch.Tensor],
                                **kwargs: Any) -> LoRANetwork:
    """A network with exactly the modules and ranks of ``state_dict``, its weights loaded."""
    return create_network(unet, text_encoders, weights_sd=state_dict, **kwargs)
