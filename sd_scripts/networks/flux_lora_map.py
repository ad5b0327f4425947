"""Which weight of a FLUX.1 checkpoint each kohya LoRA module changes (merges into checkpoints, extraction).

Driven by the checkpoint's own keys, so any block count works (full size and the tiny test model alike):

* the transformer in Black Forest Labs' layout, with or without ComfyUI's ``model.diffusion_model.`` prefix: kohya
  names a module ``lora_unet_`` + its BFL path with "." -> "_" (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``), so every transformer weight maps 1:1 and keeps its fused projections. The
  block linears kohya's LoRA trains (``files.lora_keys.FLUX_LORA_TARGETS``) are the LoRA targets (what extraction
  covers); the embedders and the final layer map too (kohya's ``in_dims``, LyCORIS presets), as non-targets;
* the same layers under diffusers' module paths (``lora_unet_transformer_blocks_0_attn_to_q``,
  ``lora_unet_single_transformer_blocks_0_proj_mlp``) as aliases: the fused BFL weights get them as row ranges
  (q, k, v thirds of ``qkv``; q, k, v and the MLP input of ``linear1``); diffusers' ``norm_out.linear`` is left out
  (its halves are swapped relative to BFL's);
* an all-in-one file's CLIP-L (``...clip_l.transformer.text_model.*``, ``lora_te1_``, HF names) and T5-XXL
  (``...t5xxl.transformer.encoder.*``, ``lora_te3_``, kohya's T5 targets: attention q/k/v/o and the gated MLP).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sd_scripts.files.lora_keys import FLUX_LORA_TARGETS, PREFIX_TE1, PREFIX_TE3, PREFIX_UNET
from sd_scripts.networks.ldm_lora_map import LdmTarget, clip_targets

__all__ = ["FluxLayout", "build_flux_lora_map", "flux_layout"]

_BLOCK_WEIGHT = re.compile(r"^(.*?)(double_blocks|single_blocks)\.(\d+)\.(.+)\.weight$")
_CLIP = re.compile(r"^(.*?)text_model\.encoder\.layers\.\d+\.self_attn\.q_proj\.weight$")
_T5 = re.compile(r"^(.*?)encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$")
_T5_TARGET = re.compile(r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))$")


@dataclass(frozen=True)
class FluxLayout:
    """Key prefixes of the parts a FLUX.1 file holds (None: not in the file)."""

    transformer: str | None
    clip_l: str | None
    t5xxl: str | None


def flux_layout(keys: Iterable[str]) -> FluxLayout | None:
    """The parts of a FLUX.1 checkpoint (a BFL transformer, maybe with its text encoders), or None when ``keys``
    hold no FLUX.1 transformer."""
    transformer = clip = t5 = None
    for key in keys:
        if transformer is None and (m := _BLOCK_WEIGHT.match(key)) and m[4] in ("img_attn.qkv", "linear1"):
            transformer = m[1]
        elif clip is None and (m := _CLIP.match(key)):
            clip = m[1]
        elif t5 is None and (m := _T5.match(key)):
            t5 = m[1]
    if transformer is None:
        return None
    return FluxLayout(transformer, clip, t5)


def _name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def _is_block_target(path: str) -> bool:
    parts = path.split(".", 2)
    return len(parts) == 3 and parts[0] in FLUX_LORA_TARGETS and parts[2] in FLUX_LORA_TARGETS[parts[0]]


def _shape(shapes: Mapping, key: str) -> tuple[int, ...]:
    value = shapes[key]
    return tuple(int(s) for s in getattr(value, "shape", value))


def _transformer_targets(out: dict, shapes: Mapping, key_set: set, prefix: str) -> None:
    from sd_scripts.models.flux.diffusers_keys import bfl_module_to_diffusers, fused_module_splits

    paths = sorted(k[len(prefix):-len(".weight")] for k in key_set
                   if k.startswith(prefix) and k.endswith(".weight") and len(_shape(shapes, k)) == 2)
    for path in paths:
        key = f"{prefix}{path}.weight"
        bias = f"{prefix}{path}.bias"
        name = _name(PREFIX_UNET, path)
        out[name] = LdmTarget(name, key, bias if bias in key_set else None, None, "unet", _is_block_target(path))
    bfl_paths = [p + ".weight" for p in paths]
    for bfl, diffusers in bfl_module_to_diffusers(bfl_paths).items():
        key = f"{prefix}{bfl}.weight"
        if key in key_set and not diffusers.startswith("norm_out."):
            bias = f"{prefix}{bfl}.bias"
            alias = _name(PREFIX_UNET, diffusers)
            out.setdefault(alias, LdmTarget(alias, key, bias if bias in key_set else None, None, "unet", False))
    hidden = _shape(shapes, f"{prefix}img_in.weight")[0] if f"{prefix}img_in.weight" in key_set else None
    if hidden is None:
        return
    for bfl, (diffusers_parts, sizes) in fused_module_splits(bfl_paths, hidden).items():
        key = f"{prefix}{bfl}.weight"
        if key not in key_set:
            continue
        rows = _shape(shapes, key)[0]
        sizes = [rows // len(diffusers_parts)] * len(diffusers_parts) if sizes is None else list(sizes)
        fixed = sum(s for s in sizes if s >= 0)
        sizes = [s if s >= 0 else rows - fixed for s in sizes]
        bias = f"{prefix}{bfl}.bias"
        start = 0
        for part, size in zip(diffusers_parts, sizes):
            alias = _name(PREFIX_UNET, part)
            out.setdefault(alias, LdmTarget(alias, key, bias if bias in key_set else None, (start, start + size), "unet",
                                            False))
            start += size


def _t5_targets(out: dict, key_set: set, prefix: str) -> None:
    for key in sorted(key_set):
        if not (key.startswith(prefix + "encoder.") and key.endswith(".weight")):
            continue
        path = key[len(prefix):-len(".weight")]
        if "layer_norm" in path:
            continue
        name = _name(PREFIX_TE3, path)
        bias = f"{prefix}{path}.bias"
        out[name] = LdmTarget(name, key, bias if bias in key_set else None, None, "te", bool(_T5_TARGET.search(path)))


def build_flux_lora_map(shapes: Mapping[str, tuple], layout: FluxLayout | None = None) -> dict[str, LdmTarget]:
    """``{kohya module name: LdmTarget}`` for every weight of a FLUX.1 checkpoint (see the module docstring).

    ``shapes`` maps the file's keys to shapes (or tensors)."""
    key_set = set(shapes)
    layout = layout or flux_layout(key_set)
    out: dict[str, LdmTarget] = {}
    if layout is None:
        return out
    if layout.transformer is not None:
        _transformer_targets(out, shapes, key_set, layout.transformer)
    if layout.clip_l is not None:
        clip_targets(out, sorted(key_set), key_set, layout.clip_l, PREFIX_TE1)
    if layout.t5xxl is not None:
        _t5_targets(out, key_set, layout.t5xxl)
    return out
