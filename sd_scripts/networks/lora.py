"""Kohya's LoRA / LoCon network for SD1/SD2 (diffusers UNet, transformers CLIP text encoders).

The network does not copy or replace the model's layers: each :class:`LoRAModule` patches the
``forward`` of the layer it adapts (``y = org(x) + up(drop(down(x))) * multiplier * alpha/dim``),
and :meth:`LoRANetwork.remove` puts the original forward back. Module names and the state dict
are exactly kohya's (see :mod:`sd_scripts.networks.lora_keys`).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sd_scripts.library.errors import ConfigError
from sd_scripts.networks import lora_keys
from sd_scripts.networks.lora_keys import PREFIX_UNET

__all__ = [
    "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_MODULE_CONV2D_3X3", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "NETWORK_ARG_TYPES", "LoRAModule", "LoRANetwork", "LoadResult", "create_network", "create_network_from_weights",
    "dims_from_state_dict", "lora_delta_weight", "parse_network_args", "split_network_args",
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


# --------------------------------------------------------------------------- network_args

def split_network_args(network_args: Sequence[str] | Mapping[str, Any] | str | None) -> dict[str, str]:
    """``["conv_dim=4", "conv_alpha=1"]`` -> ``{"conv_dim": "4", "conv_alpha": "1"}`` (verbatim strings,
    as kohya stores them in ``ss_network_args``)."""
    if network_args is None:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in network_args.items()}
    if isinstance(network_args, str):
        network_args = network_args.split()
    out: dict[str, str] = {}
    for item in network_args:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"network_args: {item!r} is not key=value; write it like conv_dim=4", setting="network_args")
        out[key] = value
    return out


def _parse_number(key: str, value: Any, kind: type) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and number != int(number)):
        expected, example = ("a whole number", "4") if kind is int else ("a number", "0.1")
        raise ConfigError(f"network_args: {key}={value!r} is not {expected}; write it like {key}={example}",
                          setting="network_args")
    return int(number) if kind is int else number


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

class LoRAModule(nn.Module):
    """One LoRA (or LoCon) adapter around a ``Linear`` or ``Conv2d``.

    Parameters: ``lora_down`` (kaiming-uniform init, like ``nn.Linear``) and ``lora_up`` (zeros), so
    the adapted layer equals the original at start; buffer ``alpha`` (0-dim float32)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
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
        # The adapted layer is kept outside the module tree so it is not part of the state dict.
        object.__setattr__(self, "org_module", org_module)
        self.org_forward = None
        self._saved_forward: tuple[bool, Any] | None = None

    # ---- patching
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

    def __init__(self, unet_loras: Sequence[LoRAModule], text_encoder_loras: Sequence[LoRAModule],
                 te_prefixes: Sequence[str] = (lora_keys.PREFIX_TE,), multiplier: float = 1.0):
        super().__init__()
        self.unet_loras = list(unet_loras)
        self.text_encoder_loras = list(text_encoder_loras)
        self.te_prefixes = tuple(te_prefixes)
        self.multiplier = multiplier
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

    # ---- optimizer
    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Kohya's parameter groups: text encoder(s) at ``text_encoder_lr`` (or ``default_lr``), UNet at
        ``unet_lr`` (or ``default_lr``). Groups whose lr is 0 or None are left out and their
        parameters stop requiring grad. Returns ``(param_groups, group_names)``; names are
        ``"textencoder"`` (``"textencoder1"``, ``"textencoder2"`` with two text encoders) and ``"unet"``."""
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        names: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, name: str) -> None:
            params = [p for lora in loras for p in lora.parameters()]
            if not params:
                return
            if lr is None or lr == 0:
                for p in params:
                    p.requires_grad_(False)
                return
            groups.append({"params": params, "lr": lr})
            names.append(name)

        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = [lr for lr in text_encoder_lr]
        else:
            te_lrs = [text_encoder_lr]
        if not te_lrs:
            te_lrs = [None]
        te_lrs = [default_lr if lr is None else lr for lr in te_lrs]
        if len(self.te_prefixes) <= 1:
            add(self.text_encoder_loras, te_lrs[0], "textencoder")
        else:
            for i, prefix in enumerate(self.te_prefixes):
                loras = [lora for lora in self.text_encoder_loras if lora_keys.prefix_of(lora.lora_name) == prefix]
                add(loras, te_lrs[i] if i < len(te_lrs) else te_lrs[0], f"textencoder{i + 1}")
        add(self.unet_loras, default_lr if unet_lr is None else unet_lr, "unet")
        return groups, names

    # ---- state dict
    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """``{<name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha}`` for every module (detached)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

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
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            for tensor, param, label in ((down, lora.lora_down.weight, "lora_down"), (up, lora.lora_up.weight, "lora_up")):
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ConfigError(
                        f"{setting}: {name}.{label} has shape {tuple(tensor.shape)} but the network expects "
                        f"{tuple(param.shape)}; turn on dim_from_weights or set network_dim/conv_dim to the file's rank",
                        setting=setting)
            lora.lora_down.weight.copy_(down.to(lora.lora_down.weight.dtype))
            lora.lora_up.weight.copy_(up.to(lora.lora_up.weight.dtype))
            alpha = parts.get("alpha")
            lora.set_alpha(None if alpha is None else float(alpha.float().item()))
        if strict and (result.missing or result.unexpected):
            if result.unexpected:
                detail = f"has {len(result.unexpected)} modules this network lacks (e.g. {result.unexpected[0]})"
            else:
                detail = f"lacks {len(result.missing)} modules of this network (e.g. {result.missing[0]})"
            raise ConfigError(f"{setting}: the file {detail}; use a LoRA trained for this model with the same "
                              "network settings, or turn on dim_from_weights", setting=setting)
        return result


# --------------------------------------------------------------------------- construction

def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _find_targets(root: nn.Module, prefix: str, target_classes: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """``[(kohya name, layer)]`` for every Linear/Conv2d inside a module of one of ``target_classes``."""
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
            found.append((lora_keys.lora_name(prefix, full), child))
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
                   weights_sd: Mapping[str, torch.Tensor] | None = None) -> LoRANetwork:
    """Build kohya's LoRA network (not yet applied: call :meth:`LoRANetwork.apply_to`).

    ``network_dim`` None means 4, ``network_alpha`` None means 1.0, ``conv_alpha`` None means 1.0
    when ``conv_dim`` is set; an alpha of 0 means alpha = dim. ``module_dims``
    (``{kohya name: (rank, alpha)}``, see :func:`dims_from_state_dict`) builds exactly the modules of
    a file, with its ranks (``dim_from_weights``); a module the model lacks raises ConfigError
    naming ``network_weights``. ``weights_sd`` (a kohya state dict) does the same with the file's
    ranks and also loads its weights."""
    if weights_sd is not None:
        network = create_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                                 conv_dim=conv_dim, conv_alpha=conv_alpha, dropout=dropout, rank_dropout=rank_dropout,
                                 module_dropout=module_dropout, train_unet=train_unet,
                                 train_text_encoder=train_text_encoder, te_prefixes=te_prefixes, multiplier=multiplier,
                                 module_dims=dims_from_state_dict(weights_sd))
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

    with_conv = conv_dim is not None or module_dims is not None
    unet_classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if with_conv else ())

    candidates: list[tuple[str, nn.Module]] = []
    enabled_prefixes: set[str] = set()
    if train_text_encoder:
        for prefix, te in zip(te_prefixes, tes):
            enabled_prefixes.add(prefix)
            candidates += _find_targets(te, prefix, TEXT_ENCODER_TARGET_REPLACE_MODULE)
    n_te_candidates = len(candidates)
    if train_unet and unet is not None:
        enabled_prefixes.add(PREFIX_UNET)
        candidates += _find_targets(unet, PREFIX_UNET, unet_classes)

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

    unet_loras: list[LoRAModule] = []
    te_loras: list[LoRAModule] = []
    for i, (name, layer) in enumerate(candidates):
        is_conv = isinstance(layer, nn.Conv2d)
        is_small = not is_conv or tuple(layer.kernel_size) == (1, 1)
        if module_dims is not None:
            if name not in module_dims:
                continue
            dim, alpha = module_dims[name]
        elif is_small:
            dim, alpha = network_dim, network_alpha
        elif conv_dim is not None:
            dim, alpha = conv_dim, conv_alpha
        else:
            continue
        if not dim:
            continue
        lora = LoRAModule(name, layer, multiplier=multiplier, lora_dim=dim, alpha=alpha, dropout=dropout,
                          rank_dropout=rank_dropout, module_dropout=module_dropout)
        (te_loras if i < n_te_candidates else unet_loras).append(lora)
    return LoRANetwork(unet_loras, te_loras, te_prefixes=te_prefixes, multiplier=multiplier)


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
