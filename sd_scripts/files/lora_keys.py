"""Kohya LoRA key names: the one place that knows how LoRA modules are named in a file.

A kohya LoRA file names each adapted layer ``<prefix>_<module path with "." -> "_">`` and stores
``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` for it.

* UNet prefix ``lora_unet``; SD1/SD2 UNet paths are diffusers paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).
* FLUX.1: the transformer's paths are Black Forest Labs' checkpoint names (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``: fused q/k/v, and q/k/v + MLP input); ``FLUX_LORA_TARGETS`` lists the
  linears kohya adapts in each block. CLIP-L is ``lora_te1``, T5-XXL ``lora_te3`` (kohya's ``lora_flux.py``;
  its paths are transformers' ``T5EncoderModel`` names, ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``).
* Text encoder prefix ``lora_te`` (SD1/SD2), ``lora_te1`` / ``lora_te2`` (SDXL). Paths are those of the
  classic transformers ``CLIPTextModel`` with its ``text_model`` submodule
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). transformers 5.6+ flattened that
  submodule away (``encoder.layers.0...``); :func:`lora_name` puts ``text_model`` back, so the
  file layout does not depend on the installed version, and :func:`canonical_lora_name` accepts
  files written with either spelling.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PREFIX_UNET", "PREFIX_TE", "PREFIX_TE1", "PREFIX_TE2", "PREFIX_TE3", "TE_PREFIXES", "ALL_PREFIXES",
    "FLUX_LORA_TARGETS", "flux_lora_module_paths",
    "DOWN_SUFFIX", "UP_SUFFIX", "ALPHA_SUFFIX", "LORA_SUFFIXES",
    "lora_name", "canonical_module_path", "canonical_lora_name", "lora_name_spellings",
    "prefix_of", "is_text_encoder_prefix", "split_key", "ParsedLoRA", "group_by_module",
    "module_name_index", "resolve_names", "iter_module_keys",
]

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"
PREFIX_TE3 = "lora_te3"  # FLUX.1's T5-XXL (kohya lora_flux.py; ComfyUI reads it too)
TE_PREFIXES = (PREFIX_TE, PREFIX_TE1, PREFIX_TE2, PREFIX_TE3)
_CLIP_PREFIXES = (PREFIX_TE, PREFIX_TE1, PREFIX_TE2)  # paths of a CLIPTextModel (``text_model.`` re-added)
ALL_PREFIXES = (PREFIX_UNET,) + TE_PREFIXES

DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
LORA_SUFFIXES = (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX)

# Top-level children of the classic ``CLIPTextModel.text_model`` (also of the SDXL
# ``CLIPTextModelWithProjection.text_model``) that a flattened model exposes at its root.
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
_TEXT_MODEL = "text_model"

# Longest prefixes first so that "lora_te1_..." is never read as "lora_te" + "1_...".
_PREFIXES_LONGEST_FIRST = tuple(sorted(ALL_PREFIXES, key=len, reverse=True))


def is_text_encoder_prefix(prefix: str) -> bool:
    return prefix in TE_PREFIXES


def canonical_module_path(prefix: str, module_path: str) -> str:
    """The module path kohya would have seen: ``text_model.`` re-added for flattened text encoders."""
    if prefix in _CLIP_PREFIXES:
        head = module_path.split(".", 1)[0]
        if head in _TEXT_MODEL_CHILDREN:
            return f"{_TEXT_MODEL}.{module_path}"
    return module_path


def lora_name(prefix: str, module_path: str) -> str:
    """Kohya's module name: ``lora_name("lora_unet", "mid_block.attentions.0.proj_in")``
    -> ``"lora_unet_mid_block_attentions_0_proj_in"``. Text-encoder paths are normalised
    (see :func:`canonical_module_path`)."""
    if prefix not in ALL_PREFIXES:
        raise ValueError(f"unknown LoRA prefix {prefix!r}")
    path = canonical_module_path(prefix, module_path)
    return f"{prefix}_{path}".replace(".", "_")


def prefix_of(name: str) -> str | None:
    """The kohya prefix a module name starts with (``lora_te1`` for ``lora_te1_text_model_...``), or None."""
    for prefix in _PREFIXES_LONGEST_FIRST:
        if name.startswith(prefix + "_"):
            return prefix
    return None


def canonical_lora_name(name: str) -> str:
    """Map any accepted spelling of a module name to kohya's: ``lora_te_encoder_layers_0_mlp_fc1``
    (written by tools running transformers 5.6+) -> ``lora_te_text_model_encoder_layers_0_mlp_fc1``.
    Other names are returned unchanged."""
    prefix = prefix_of(name)
    if prefix is None or prefix not in _CLIP_PREFIXES:
        return name
    rest = name[len(prefix) + 1:]
    for child in _TEXT_MODEL_CHILDREN:
        if rest == child or rest.startswith(child + "_"):
            return f"{prefix}_{_TEXT_MODEL}_{rest}"
    return name


def lora_name_spellings(name: str) -> tuple[str, ...]:
    """Every spelling of ``name`` that loaders accept: the kohya name first, then the flattened one."""
    canon = canonical_lora_name(name)
    prefix = prefix_of(canon)
    if prefix in _CLIP_PREFIXES:
        rest = canon[len(prefix) + 1:]
        if rest.startswith(_TEXT_MODEL + "_"):
            return canon, f"{prefix}_{rest[len(_TEXT_MODEL) + 1:]}"
    return (canon,)


# The linears kohya's FLUX.1 LoRA adapts in each block (module paths inside the block, BFL names).
FLUX_LORA_TARGETS = {
    "double_blocks": ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                      "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"),
    "single_blocks": ("linear1", "linear2", "modulation.lin"),
}


def flux_lora_module_paths(depth: int, depth_single_blocks: int, blocks: str = "all") -> list[str]:
    """Module paths of every FLUX.1 block linear a kohya LoRA adapts (``blocks``: all, double or single)."""
    paths = []
    for head, count in (("double_blocks", depth), ("single_blocks", depth_single_blocks)):
        if blocks in ("all", head.split("_")[0]):
            paths += [f"{head}.{i}.{t}" for i in range(count) for t in FLUX_LORA_TARGETS[head]]
    return paths


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_down.weight"`` -> ``("lora_unet_x", "lora_down.weight")``.

    Module names never contain a dot, so the name is everything before the first one.
    A key without a dot gives ``(key, "")``."""
    name, _, part = key.partition(".")
    return name, part


@dataclass
class ParsedLoRA:
    """A state dict grouped by module: ``modules[name][part]`` where part is ``"lora_down.weight"``,
    ``"lora_up.weight"``, ``"alpha"`` (or a LyCORIS part such as ``"hada_w1_a"``).
    Names are canonical kohya names. ``other_keys`` lists keys that do not belong to a
    kohya-prefixed module."""

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)

    def names(self, prefix: str | None = None) -> list[str]:
        if prefix is None:
            return list(self.modules)
        return [n for n in self.modules if prefix_of(n) == prefix]

    def rank(self, name: str) -> int | None:
        """The rank of a LoRA/LoCon module (rows of ``lora_down``), or None when it has no ``lora_down``."""
        down = self.modules[name].get("lora_down.weight")
        return None if down is None else int(down.shape[0])

    def alpha(self, name: str) -> float | None:
        """The module's alpha as a float; a missing alpha means alpha = rank (kohya/ComfyUI/diffusers)."""
        parts = self.modules[name]
        if "alpha" in parts:
            value = parts["alpha"]
            return float(value.item() if hasattr(value, "item") else value)
        rank = self.rank(name)
        return None if rank is None else float(rank)

    def is_plain_lora(self) -> bool:
        """True when every module has exactly ``lora_down``/``lora_up`` (and optionally ``alpha``)."""
        allowed = {"lora_down.weight", "lora_up.weight", "alpha"}
        return not self.other_keys and all(
            {"lora_down.weight", "lora_up.weight"} <= set(parts) <= allowed for parts in self.modules.values()
        )


def group_by_module(state_dict: Mapping[str, Any]) -> ParsedLoRA:
    """Group a LoRA state dict by (canonical) module name."""
    parsed = ParsedLoRA()
    for key, value in state_dict.items():
        name, part = split_key(key)
        if not part or prefix_of(name) is None:
            parsed.other_keys.append(key)
            continue
        parsed.modules.setdefault(canonical_lora_name(name), {})[part] = value
    return parsed


def module_name_index(prefix: str, model: Any, types: tuple[type, ...] | None = None) -> dict[str, str]:
    """``{kohya name: module path}`` for every submodule of ``model`` (optionally only of ``types``)."""
    index: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or (types is not None and not isinstance(module, types)):
            continue
        index[lora_name(prefix, path)] = path
    return index


def resolve_names(names: Iterable[str], models: Mapping[str, Any],
                  types: tuple[type, ...] | None = None) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map a file's module names to live modules.

    ``models`` maps prefixes to root modules (``{"lora_unet": unet, "lora_te": text_encoder}``).
    Returns ``({canonical name: (prefix, module path)}, [names not found])``; both TE spellings
    are accepted."""
    indexes = {prefix: module_name_index(prefix, model, types) for prefix, model in models.items() if model is not None}
    found: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    for name in names:
        canon = canonical_lora_name(name)
        prefix = prefix_of(canon)
        path = indexes.get(prefix, {}).get(canon) if prefix is not None else None
        if path is None:
            missing.append(name)
        else:
            found[canon] = (prefix, path)
    return found, missing


def iter_module_keys(name: str) -> Iterator[str]:
    """The three tensor keys of a plain LoRA module."""
    yield name + DOWN_SUFFIX
    yield name + UP_SUFFIX
    yield name + ALPHA_SUFFIX
