"""kohya's ``base_weights``: LoRA/LyCORIS files merged into the loaded base model before training.

The base model is then "model + LoRA"; the trained network learns on top of it and is saved alone.
Each module's delta comes from :mod:`sd_scripts.networks.network_state` (LoRA/LoCon, LoHa, LoKr,
full, IA3, GLoRA, norm), so the same math as the merge tools; it is added in float32 and written back in the
layer's dtype: ``W += multiplier * delta``. DoRA, OFT and BOFT modules replace the weight by their merged
weight given it (``NetModule.merged_weight``, LyCORIS' ``get_merged_weight(multiplier)``).

Module names are matched as every loader does: UNet layers by their kohya name in the family's file
layout (SGM names for SDXL, :meth:`ModelFamily.lora_unet_path_map`) or their diffusers name, text
encoders by ``lora_te`` / ``lora_te1`` / ``lora_te2`` (either spelling of ``text_model``).

:func:`check_base_weights` is the cheap preflight part (file readable, a LoRA, made for the model's
family, one multiplier per file); :func:`merge_base_weights` does the work once the model is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.core.problems import Problems
from sd_scripts.files import lora_keys

__all__ = ["check_base_weights", "lora_file_family", "merge_base_weights", "merge_state_dict_into_model",
           "multipliers_for"]

_SETTING = "base_weights"
_SDXL_NAME = re.compile(r"^lora_(te1|te2)_|^lora_unet_(input_blocks|middle_block|output_blocks)_")
_TE_LAYER = re.compile(r"^lora_te_(?:text_model_)?encoder_layers_(\d+)_")


def multipliers_for(paths: Sequence[str], multipliers: Sequence[float] | None) -> list[float]:
    """One multiplier per file: the given ones, or 1.0 each when none are given."""
    if not multipliers:
        return [1.0] * len(paths)
    return [float(m) for m in multipliers]


def lora_file_family(keys, metadata: dict[str, str]) -> str | None:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a LoRA file from its metadata (``ss_base_model_version``) or, failing
    that, its module names (SDXL text encoders / SGM UNet blocks; SD2's 23 text-encoder layers); None when unknown."""
    version = str(metadata.get("ss_base_model_version") or "").lower()
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    names = [k.partition(".")[0] for k in keys if k != "__metadata__"]
    if any(_SDXL_NAME.match(n) for n in names):
        return "sdxl"
    layers = [int(m.group(1)) for m in map(_TE_LAYER.match, names) if m]
    if layers and max(layers) >= 12:
        return "sd2"
    return None


def _read_keys(path: str) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata of a LoRA file: the safetensors header only, or the whole (small) torch file."""
    from sd_scripts.files.lora_file import _read_header, load_lora_file

    try:
        header, metadata = _read_header(Path(path))
    except (ValueError, UnicodeDecodeError):
        state_dict, metadata = load_lora_file(path, setting=_SETTING)
        return list(state_dict), metadata
    keys = [k for k in header if k != "__metadata__"]
    if not any(lora_keys.prefix_of(k.partition(".")[0]) for k in keys):
        raise ConfigError(f"base_weights: {path} has no lora_unet_/lora_te_ keys, so it is not a LoRA/LyCORIS file; "
                          "give LoRA files to merge into the model", _SETTING)
    return keys, dict(metadata)


def check_base_weights(config: TrainConfig, family: Any = None, problems: Problems | None = None) -> list[UserError]:
    """Preflight: every ``base_weights`` file exists, reads as a LoRA made for ``family`` (a ModelFamily or its
    name; unchecked when None), and ``base_weights_multiplier`` has one number per file. Recorded in ``problems``,
    whose errors it returns."""
    paths = list(config.base_weights or [])
    multipliers = config.base_weights_multiplier
    problems = Problems() if problems is None else problems
    if multipliers and not paths:
        problems.add(ConfigError("base_weights_multiplier: given without base_weights; set base_weights to the "
                                 "LoRA files to merge or remove the multipliers", "base_weights_multiplier"))
    elif multipliers and len(multipliers) != len(paths):
        problems.add(ConfigError(f"base_weights_multiplier: {len(multipliers)} values for {len(paths)} base_weights "
                                 "files; give one multiplier per file (or none for 1.0 each)",
                                 "base_weights_multiplier"))
    for m in multipliers or []:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m or m in (float("inf"), float("-inf")):
            problems.add(ConfigError(f"base_weights_multiplier: {m!r} is not a number; write numbers like 1.0 0.5",
                                     "base_weights_multiplier"))
            break
    family_name = getattr(family, "name", family)
    for path in paths:
        if not os.path.exists(path):
            problems.add(ConfigError(f"base_weights: not found: {path}; check the path", _SETTING))
            continue
        if not os.path.isfile(path):
            problems.add(ConfigError(f"base_weights: {path} is a folder; give a LoRA file", _SETTING))
            continue
        try:
            keys, metadata = _read_keys(path)
        except UserError as e:
            problems.add(e)
            continue
        except OSError as e:
            problems.add(ConfigError(f"base_weights: {path} cannot be read ({e.strerror or e}); check its "
                                     "permissions", _SETTING))
            continue
        made_for = lora_file_family(keys, metadata)
        if family_name and made_for and made_for != family_name:
            problems.add(ConfigError(f"base_weights: {path} is a LoRA for {made_for}, but the base model is "
                                     f"{family_name}; give LoRAs made for this model", _SETTING))
    return problems.errors


def _module_index(model) -> dict[str, Any]:
    """``{kohya module name: layer}`` for every layer with a weight of the UNet and the text encoders."""
    family = model.family
    index: dict[str, Any] = {}
    path_map_of = getattr(family, "lora_unet_path_map", None)
    path_map = path_map_of(model.unet) if path_map_of is not None else None
    for path, module in model.unet.named_modules():
        if not path or getattr(module, "weight", None) is None:
            continue
        index[lora_keys.lora_name(lora_keys.PREFIX_UNET, path)] = module
        if path_map is not None:
            try:
                mapped = path_map(path)
            except (KeyError, ValueError, IndexError):
                mapped = None
            if mapped:
                index[lora_keys.lora_name(lora_keys.PREFIX_UNET, mapped)] = module
    for prefix, te in zip(family.te_lora_prefixes, model.text_encoders):
        if te is None:
            continue
        for path, module in te.named_modules():
            if path and getattr(module, "weight", None) is not None:
                index[lora_keys.lora_name(prefix, path)] = module
    return index


def _delta_of(mod, layer, source: str):
    """``(weight delta, bias delta or None)`` of one parsed module for ``layer``, in float32 on the layer's device;
    ``(None, None)`` for a module that transforms the weight (DoRA, OFT, BOFT: see ``merge_state_dict_into_model``)."""
    import torch

    from sd_scripts.networks import lora_math as lm

    weight = layer.weight
    mod = mod.to(weight.device)
    if mod.algo == "ia3":
        on_input = bool(mod.parts["on_input"].reshape(-1)[0]) if "on_input" in mod.parts else False
        return lm.ia3_delta(weight.float(), mod.t("weight"), on_input), None
    if mod.algo == "norm":
        return mod.t("w_norm").reshape(weight.shape), (mod.t("b_norm") if "b_norm" in mod.parts else None)
    if mod.algo in ("oft", "boft"):
        if mod.out_size != weight.shape[0]:
            raise ConfigError(f"base_weights: {source}: {mod.algo.upper()} module {mod.name} rotates {mod.out_size} "
                              f"rows but the model's layer is {tuple(weight.shape)}; the file is for another model, "
                              "give LoRAs made for this one", _SETTING)
        return None, None
    if int(torch.tensor(mod.weight_shape()).prod()) != weight.numel():
        raise ConfigError(f"base_weights: {source}: module {mod.name} has shape {tuple(mod.weight_shape())} but the "
                          f"model's layer is {tuple(weight.shape)}; the file is for another model, give LoRAs made "
                          "for this one", _SETTING)
    if mod.is_dora and mod.parts["dora_scale"].numel() not in (weight.shape[0], weight.shape[1]):
        raise ConfigError(f"base_weights: {source}: DoRA module {mod.name} has a dora_scale of "
                          f"{mod.parts['dora_scale'].numel()} values for the layer {tuple(weight.shape)}; the file is "
                          "damaged or for another model", _SETTING)
    if mod.transforms_base:
        return None, None
    bias = mod.t("diff_b") if mod.algo == "full" and "diff_b" in mod.parts else None
    return mod.base_delta(weight) if mod.algo == "glora" else mod.delta(weight.shape), bias


def merge_state_dict_into_model(model, state_dict, multiplier: float = 1.0, source: str = "LoRA",
                                index: dict[str, Any] | None = None,
                                metadata: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Add ``multiplier x`` every module of a LoRA/LyCORIS state dict into ``model``'s layers, in place.

    Returns ``(modules merged, names of the file's modules that match no layer)``. A file none of whose modules
    match, or a module whose shape differs from its layer, raises ConfigError naming base_weights."""
    import torch

    from sd_scripts.networks.network_state import parse_network

    try:
        modules = parse_network(state_dict, source=source, metadata=metadata, with_base=True)
    except ConfigError as e:
        raise ConfigError(f"base_weights: {e}", _SETTING) from None
    index = _module_index(model) if index is None else index
    found = {name: index[spelling] for name in modules
             for spelling in lora_keys.lora_name_spellings(name) if spelling in index}
    unmatched = [name for name in modules if name not in found]
    if not found:
        raise ConfigError(f"base_weights: {source} has no module of this model (e.g. {unmatched[0]}); give LoRAs "
                          "made for this base model", _SETTING)
    with torch.no_grad():
        for name, layer in found.items():
            delta, bias_delta = _delta_of(modules[name], layer, source)
            weight = layer.weight
            if delta is None:
                merged = modules[name].to(weight.device).merged_weight(weight.float(), multiplier)
                weight.copy_(merged.to(weight.dtype))
            else:
                weight.copy_((weight.float() + delta * multiplier).to(weight.dtype))
            if bias_delta is not None and getattr(layer, "bias", None) is not None:
                layer.bias.copy_((layer.bias.float() + bias_delta.reshape(layer.bias.shape) * multiplier)
                                 .to(layer.bias.dtype))
    return len(found), unmatched


def merge_base_weights(model, paths: Sequence[str], multipliers: Sequence[float] | None = None) -> list[str]:
    """Merge every ``base_weights`` file into ``model`` (a LoadedModel) with its multiplier; returns one line per
    file for the caller to show (how many modules were merged, and any that match no layer)."""
    from sd_scripts.files.lora_file import load_lora_file

    lines = []
    index = _module_index(model)
    for path, multiplier in zip(paths, multipliers_for(paths, multipliers)):
        state_dict, metadata = load_lora_file(path, setting=_SETTING)
        merged, unmatched = merge_state_dict_into_model(model, state_dict, multiplier, source=str(path), index=index,
                                                        metadata=metadata)
        line = f"base_weights: merged {os.path.basename(path)} x {multiplier:g} ({merged} modules)"
        if unmatched:
            line += f"; {len(unmatched)} modules match no layer of this model and were ignored (e.g. {unmatched[0]})"
        lines.append(line)
    return lines
