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

This module finds the targets and builds the network (:func:`create_network`); the modules are in
:mod:`.lora_modules`, the network object in :mod:`.lora_network` (both importable from here too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.block_weights import BlockSettings
from sd_scripts.files.lora_keys import PREFIX_UNET
from sd_scripts.networks.lora_modules import AdapterModule, LoRAModule, lora_delta_weight, max_norm_ratio
from sd_scripts.networks.lora_network import LoadResult, LoRANetwork, build_param_groups
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
    targets (DyLoRA); a factory with a ``split_for(name)`` attribute trains fused projections split (split_qkv),
    so ``weights_sd`` ranks of those are read as parts x rank. ``targets`` (``ModelFamily.lora_targets``) replaces kohya's SD target classes (FLUX.1:
    the double/single blocks, CLIP-L and T5) and gives per-module-type ranks (``dim_for``)."""
    plus = dict(loraplus_lr_ratio=loraplus_lr_ratio, loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio)
    if weights_sd is not None:
        network = create_network(unet, text_encoders, network_dim=network_dim, network_alpha=network_alpha,
                                 conv_dim=conv_dim, conv_alpha=conv_alpha, dropout=dropout, rank_dropout=rank_dropout,
                                 module_dropout=module_dropout, train_unet=train_unet,
                                 train_text_encoder=train_text_encoder, te_prefixes=te_prefixes, multiplier=multiplier,
                                 module_dims=_split_module_dims(dims_from_state_dict(weights_sd), module_factory),
                                 unet_path_map=unet_path_map,
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

    plus = _checked_loraplus(plus)
    use_blocks = blocks is not None and module_dims is None
    with_conv = conv_dim is not None or module_dims is not None or (use_blocks and blocks.has_conv)
    unet_classes, te_classes, dim_for = _target_classes(targets, with_conv, len(tes))
    candidates, n_te_candidates, enabled_prefixes = _candidates(
        unet if train_unet else None, tes if train_text_encoder else [], te_prefixes, te_classes, unet_classes,
        unet_path_map, tuple(getattr(targets, "unet_extra_paths", ()) or ()))
    if module_dims is not None:
        module_dims = _checked_module_dims(module_dims, candidates, enabled_prefixes, te_prefixes)

    ranks = _Ranks((network_dim, network_alpha), (conv_dim, conv_alpha), module_dims, blocks if use_blocks else None,
                   dim_for)
    make = functools.partial(module_factory or LoRAModule, multiplier=multiplier, dropout=dropout,
                             rank_dropout=rank_dropout, module_dropout=module_dropout)
    unet_loras, te_loras = _build_modules(candidates, n_te_candidates, ranks, make)
    return (network_class or LoRANetwork)(unet_loras, te_loras, te_prefixes=te_prefixes, multiplier=multiplier,
                                          blocks=blocks, **plus)


def _checked_loraplus(plus: dict[str, float | None]) -> dict[str, float | None]:
    """The ``loraplus_*`` ratios as floats above 0 (None: not set)."""
    checked = dict(plus)
    for key, ratio in plus.items():
        if ratio is not None:
            checked[key] = _check_float(key, ratio, "network_args")
            if checked[key] <= 0:
                raise ConfigError(f"network_args: {key}={ratio} must be above 0", setting="network_args")
    return checked


@dataclass(frozen=True)
class _Ranks:
    """What gives each module its rank and alpha (see :func:`_rank_of`); ``blocks`` only for UNet modules."""

    linear: tuple[int, float]
    conv: tuple[int | None, float]
    module_dims: Mapping[str, tuple[int, float]] | None
    blocks: BlockSettings | None
    dim_for: Any


def _build_modules(candidates: list, n_te_candidates: int, ranks: _Ranks,
                   make: Callable[..., AdapterModule]) -> tuple[list[AdapterModule], list[AdapterModule]]:
    """(UNet modules, text-encoder modules): one module per candidate layer whose rank is not 0 (the text
    encoders' candidates come first)."""
    unet_loras: list[AdapterModule] = []
    te_loras: list[AdapterModule] = []
    for i, (name, layer) in enumerate(candidates):
        block_settings = ranks.blocks if i >= n_te_candidates else None
        dim, alpha = _rank_of(name, layer, ranks.module_dims, block_settings, ranks.linear, ranks.conv, ranks.dim_for)
        if not dim:
            continue
        lora = make(name, layer, lora_dim=dim, alpha=alpha)
        (te_loras if i < n_te_candidates else unet_loras).append(lora)
    return unet_loras, te_loras


def _target_classes(targets: Any, with_conv: bool, n_text_encoders: int):
    """(UNet classes, one class list per text encoder, ``dim_for``): kohya's SD targets, or a family's
    (``ModelFamily.lora_targets``) with its per-module-type ranks."""
    if targets is None:
        unet_classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if with_conv else ())
        return unet_classes, (TEXT_ENCODER_TARGET_REPLACE_MODULE,) * n_text_encoders, None
    unet_classes = tuple(targets.unet_classes) + (tuple(targets.unet_conv_classes) if with_conv else ())
    return unet_classes, tuple(targets.te_classes), targets.dim_for


def _rank_of(name: str, layer: nn.Module, module_dims: Mapping[str, tuple[int, float]] | None,
             blocks: BlockSettings | None, linear: tuple[int, float], conv: tuple[int | None, float],
             dim_for: Callable[[str], int | None] | None) -> tuple[Any, Any]:
    """(rank, alpha) of the module on ``layer``: the file's (``module_dims``), its block's, ``linear`` for Linear and
    1x1 convs (the rank ``dim_for`` gives the module's type, if any), ``conv`` for k x k convs; rank None or 0 when
    the layer gets no module."""
    is_small = not isinstance(layer, nn.Conv2d) or tuple(layer.kernel_size) == (1, 1)
    block = blocks.dim_alpha(name, not is_small) if blocks is not None else None
    if module_dims is not None:
        return module_dims.get(name, (None, None))
    if block is not None:
        return block
    if is_small:
        typed = dim_for(name) if dim_for is not None else None
        return linear if typed is None else (typed, linear[1])
    return conv if conv[0] is not None else (None, None)


def _candidates(unet: nn.Module | None, tes: list[nn.Module], te_prefixes: tuple[str, ...],
                te_classes: Sequence[Sequence[str]], unet_classes: tuple[str, ...],
                unet_path_map: Callable[[str], str] | None,
                extra_paths: Sequence[str] = ()) -> tuple[list[tuple[str, nn.Module]], int, set[str]]:
    """(every (kohya name, layer) the network may adapt: the text encoders' first, then the UNet's blocks and its
    ``extra_paths``; how many of the text encoders' there are; the prefixes of the parts being trained); ``unet``
    None and ``tes`` empty for parts not trained."""
    candidates: list[tuple[str, nn.Module]] = []
    enabled_prefixes: set[str] = set()
    for prefix, te, classes in zip(te_prefixes, tes, te_classes):
        enabled_prefixes.add(prefix)
        candidates += _find_targets(te, prefix, classes)
    n_te_candidates = len(candidates)
    if unet is not None:
        enabled_prefixes.add(PREFIX_UNET)
        candidates += _find_targets(unet, PREFIX_UNET, unet_classes, unet_path_map)
        candidates += _extra_targets(unet, extra_paths)
    return candidates, n_te_candidates, enabled_prefixes


def _extra_targets(unet: nn.Module, paths: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """``[(kohya name, layer)]`` for the Linear layers at or under each of ``paths`` (a family's
    ``LoraTargets.unet_extra_paths``), in that order; a path the model lacks (schnell's guidance_in) gives none."""
    found: list[tuple[str, nn.Module]] = []
    for path in paths:
        try:
            root = unet.get_submodule(path)
        except AttributeError:
            continue
        if root is None:
            continue
        for child_path, child in root.named_modules():
            if isinstance(child, nn.Linear):
                found.append((lora_keys.lora_name(PREFIX_UNET, f"{path}.{child_path}" if child_path else path), child))
    return found


def _checked_module_dims(module_dims: Mapping[str, tuple[int, float]], candidates: list[tuple[str, nn.Module]],
                         enabled_prefixes: set[str], te_prefixes: tuple[str, ...]) -> dict[str, tuple[int, float]]:
    """A file's ``{module: (rank, alpha)}`` under canonical names; ConfigError when the model lacks some of its
    modules (of the parts being trained, or of no known part)."""
    module_dims = {lora_keys.canonical_lora_name(k): v for k, v in module_dims.items()}
    known = {name for name, _ in candidates}
    absent = [n for n in module_dims if n not in known
              and (lora_keys.prefix_of(n) in enabled_prefixes or lora_keys.prefix_of(n) not in
                   ({PREFIX_UNET} | set(te_prefixes)))]
    if absent:
        raise ConfigError(
            f"network_weights: {len(absent)} modules of the file are not in this model (e.g. {absent[0]}); "
            "the LoRA was made for another model family or network type", setting="network_weights")
    return module_dims


def _split_module_dims(module_dims: dict[str, tuple[int, float]], module_factory: Any) -> dict[str, tuple[int, float]]:
    """A file's ranks for a network whose ``module_factory`` trains fused projections split (kohya's ``split_qkv``:
    its ``split_for(name)`` gives a module's parts): the fused file holds ``parts x rank`` rows and ``parts x alpha``
    (see :mod:`.lora_split`), so each part gets rank / parts and alpha / parts. ConfigError naming network_args when a
    rank does not divide (the file was not trained with split_qkv)."""
    split_for = getattr(module_factory, "split_for", None)
    if split_for is None:
        return module_dims
    out = dict(module_dims)
    for name, (rank, alpha) in module_dims.items():
        split = split_for(lora_keys.canonical_lora_name(name))
        if not split:
            continue
        parts = len(split)
        if rank % parts:
            raise ConfigError(f"network_args: split_qkv is on, but module {name} of network_weights has rank {rank}, "
                              f"not a multiple of its {parts} parts (the file was not trained with split_qkv); turn "
                              "split_qkv off to resume it as a plain LoRA", setting="network_args")
        out[name] = (rank // parts, alpha / parts)
    return out


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
