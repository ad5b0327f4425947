"""FLUX.1 transformer keys: Black Forest Labs' layout <-> diffusers' ``FluxTransformer2DModel``.

One table of renames plus the fused projections BFL keeps in one tensor (``img_attn.qkv`` -> ``to_q``/``to_k``/
``to_v``; ``single_blocks.N.linear1`` -> q, k, v and ``proj_mlp``) and the final layer's (shift, scale) order,
which diffusers swaps. Widths come from the tensors (any model size, the tiny test model too).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["bfl_module_to_diffusers", "bfl_to_diffusers", "diffusers_to_bfl", "fused_module_splits",
           "is_diffusers_flux_state"]

_GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_indices(keys, head: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(head + ".")})


def _renames(bfl_keys) -> list[tuple[str, str]]:
    """Every (BFL module, diffusers module) pair of plain linears present in ``bfl_keys``."""
    pairs = list(_GLOBAL.items())
    for i in _block_indices(bfl_keys, "double_blocks"):
        pairs += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for b, d in _DOUBLE.items()]
    for i in _block_indices(bfl_keys, "single_blocks"):
        pairs += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for b, d in _SINGLE.items()]
    return pairs


def _norms(bfl_keys) -> list[tuple[str, str]]:
    pairs = []
    for i in _block_indices(bfl_keys, "double_blocks"):
        pairs += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for b, d in _DOUBLE_NORMS.items()]
    for i in _block_indices(bfl_keys, "single_blocks"):
        pairs += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for b, d in _SINGLE_NORMS.items()]
    return pairs


def _fused(bfl_keys, hidden: int) -> list[tuple[str, tuple[str, ...], list[int] | None]]:
    """(BFL fused module, diffusers modules, split sizes or None for equal thirds)."""
    groups = []
    for i in _block_indices(bfl_keys, "double_blocks"):
        groups += [(f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{d}" for d in ds), None)
                   for b, ds in _DOUBLE_QKV.items()]
    for i in _block_indices(bfl_keys, "single_blocks"):
        groups.append((f"single_blocks.{i}.linear1", tuple(f"single_transformer_blocks.{i}.{d}" for d in _SINGLE_LINEAR1),
                       [hidden, hidden, hidden, -1]))
    return groups


def fused_module_splits(bfl_keys, hidden: int) -> dict[str, tuple[tuple[str, ...], list[int] | None]]:
    """``{BFL fused module: (diffusers modules, split sizes)}``; -1 in the sizes: the rest (the MLP input)."""
    return {name: (targets, sizes) for name, targets, sizes in _fused(bfl_keys, hidden)}


def bfl_module_to_diffusers(bfl_keys) -> dict[str, str]:
    """``{BFL module path: diffusers module path}`` for the transformer's unfused linears (LoRA tools use it)."""
    return dict(_renames(bfl_keys)) | {_FINAL_ADALN[0]: _FINAL_ADALN[1]}


def _split(tensor: Tensor, sizes: list[int] | None, parts: int) -> tuple[Tensor, ...]:
    if sizes is None:
        return tensor.chunk(parts, dim=0)
    fixed = sum(s for s in sizes if s >= 0)
    return tensor.split([s if s >= 0 else tensor.shape[0] - fixed for s in sizes], dim=0)


def bfl_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A BFL transformer state dict (no prefix) -> diffusers ``FluxTransformer2DModel`` keys. Unknown keys raise."""
    source = dict(state_dict)
    hidden = source["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for bfl, diff in _renames(source):
        for part in ("weight", "bias"):
            if f"{bfl}.{part}" in source:
                out[f"{diff}.{part}"] = source.pop(f"{bfl}.{part}")
    for bfl, diff in _norms(source):
        out[diff] = source.pop(bfl)
    for bfl, targets, sizes in _fused(source, hidden):
        for part in ("weight", "bias"):
            if f"{bfl}.{part}" in source:
                for target, piece in zip(targets, _split(source.pop(f"{bfl}.{part}"), sizes, len(targets))):
                    out[f"{target}.{part}"] = piece
    for part in ("weight", "bias"):
        out[f"{_FINAL_ADALN[1]}.{part}"] = _swap_halves(source.pop(f"{_FINAL_ADALN[0]}.{part}"))
    if source:
        raise KeyError(f"keys not in the FLUX.1 layout: {sorted(source)[:5]}")
    return out


def diffusers_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``FluxTransformer2DModel`` keys -> BFL's (the inverse of ``bfl_to_diffusers``)."""
    source = dict(state_dict)
    double = {int(k.split(".")[1]) for k in source if k.startswith("transformer_blocks.")}
    single = {int(k.split(".")[1]) for k in source if k.startswith("single_transformer_blocks.")}
    bfl_keys = [f"double_blocks.{i}.x" for i in double] + [f"single_blocks.{i}.x" for i in single]
    hidden = source["x_embedder.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for bfl, diff in _renames(bfl_keys):
        for part in ("weight", "bias"):
            if f"{diff}.{part}" in source:
                out[f"{bfl}.{part}"] = source.pop(f"{diff}.{part}")
    for bfl, diff in _norms(bfl_keys):
        out[bfl] = source.pop(diff)
    for bfl, targets, _sizes in _fused(bfl_keys, hidden):
        for part in ("weight", "bias"):
            if f"{targets[0]}.{part}" in source:
                out[f"{bfl}.{part}"] = torch.cat([source.pop(f"{t}.{part}") for t in targets], dim=0)
    for part in ("weight", "bias"):
        out[f"{_FINAL_ADALN[0]}.{part}"] = _swap_halves(source.pop(f"{_FINAL_ADALN[1]}.{part}"))
    if source:
        raise KeyError(f"keys not in diffusers' FLUX.1 layout: {sorted(source)[:5]}")
    return out


def is_diffusers_flux_state(keys) -> bool:
    return any(k.startswith("single_transformer_blocks.") for k in keys) and "x_embedder.weight" in keys
