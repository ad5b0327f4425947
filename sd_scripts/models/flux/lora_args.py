"""kohya's FLUX.1 LoRA ``network_args`` (``networks/lora_flux.py``), parsed and checked without torch or a model.

* ``train_blocks``: all (default), single or double: which kind of transformer block gets LoRA modules;
* ``train_double_block_indices`` / ``train_single_block_indices``: which blocks of that kind do: ``all``, ``none``
  (or empty), or a comma list of indices and inclusive ranges (``0,1,8-12,18``). Not given: every block. They only
  narrow what ``train_blocks`` trains (double indices do nothing with ``train_blocks=single``);
* per-module-type ranks (``img_attn_dim`` ... ``single_mod_dim``), matched on the module name as kohya does; 0 leaves
  the type out; a block left out by the indices gets no module whatever its type's rank;
* ``in_dims``: ranks of LoRA on the input layers, five numbers in kohya's order img, time, vector, guidance, txt
  (``[4,0,0,0,4]``; 0 leaves one out); the modules are ``lora_unet_img_in``, ``lora_unet_time_in_in_layer`` /
  ``_out_layer``, ``lora_unet_vector_in_*``, ``lora_unet_guidance_in_*`` (dev models only) and ``lora_unet_txt_in``,
  with ``network_alpha``;
* ``split_qkv``, ``train_t5xxl``: true/false.

:func:`parse_flux_lora_args` checks block indices against the model's block counts when they are known (preflight
reads them from the file's keys; the network build from the loaded transformer)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems

__all__ = ["FLUX_LORA_ARGS", "IN_LAYERS", "TYPE_DIMS", "TRAIN_BLOCKS", "FluxLoraArgs", "parse_block_selection",
           "flux_lora_arg_warnings",
           "parse_flux_lora_args"]

SETTING = "network_args"
# kohya lora_flux.py network_args: per-module-type ranks, matched on the module name (its "identifier" list)
TYPE_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
             ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
             ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
TRAIN_BLOCKS = ("all", "single", "double")
# in_dims, in kohya's order: the transformer's input layers (BFL module paths)
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
INDEX_ARGS = {"double": "train_double_block_indices", "single": "train_single_block_indices"}
FLUX_LORA_ARGS = ("train_blocks", "train_t5xxl", "split_qkv", "in_dims", *INDEX_ARGS.values()) + \
    tuple(name for name, _ in TYPE_DIMS)

_BLOCK_NAME = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_")
_TRUE = ("true", "1", "yes", "on")


@dataclass(frozen=True)
class FluxLoraArgs:
    """The parsed FLUX.1 network_args. ``blocks``: ``{"double": indices or None, "single": ...}`` (None: every block
    of that kind); ``in_dims``: rank per input layer (``IN_LAYERS`` order), None when not given."""

    train_blocks: str = "all"
    type_dims: tuple = ()  # ((identifier, rank), ...) in kohya's matching order
    blocks: tuple = (("double", None), ("single", None))
    in_dims: tuple | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False

    def dim_for(self, name: str) -> int | None:
        """A transformer module's rank from these args (None: network_dim; 0: no module), kohya's order: the input
        layers' ``in_dims`` (0 without it), else its type's rank, then 0 if its block is not selected."""
        if not name.startswith("lora_unet_"):
            return None
        layer = name[len("lora_unet_"):]
        for path, rank in zip(IN_LAYERS, self.in_dims or (0,) * len(IN_LAYERS)):
            if layer == path or layer.startswith(path + "_"):
                return rank
        dim = None
        for identifier, value in self.type_dims:
            if all(part in name for part in identifier):
                dim = value
                break
        if dim != 0 and not self.selects_block(name):
            return 0
        return dim

    def selects_block(self, name: str) -> bool:
        """False for a module of a double/single block the indices leave out."""
        match = _BLOCK_NAME.match(name)
        if match is None:
            return True
        chosen = dict(self.blocks)[match[1]]
        return chosen is None or int(match[2]) in chosen


def _bad(key: str, value, fix: str) -> ConfigError:
    return ConfigError(f"{SETTING}: {key}={value} {fix}", SETTING)


def parse_block_selection(key: str, value: str, total: int | None) -> frozenset[int] | None:
    """kohya's block selection: ``all`` -> None (every block), ``none`` or empty -> no block, else the indices of a
    comma list of indices and inclusive ranges (``0,1,8-12,18``), each below ``total`` when it is known."""
    text = str(value).strip()
    if text.lower() == "all":
        return None
    if text.lower() in ("none", ""):
        return frozenset()
    example = f"write indices and ranges like {key}=0,1,8-12"
    chosen: set[int] = set()
    for part in text.split(","):
        start, dash, end = part.partition("-")
        try:
            first, final = int(start), int(end if dash else start)
        except ValueError:
            raise _bad(key, value, f"has {part.strip()!r}, not an index or a range; {example}") from None
        if first < 0 or first > final:
            raise _bad(key, value, f"has the range {part.strip()}, which is empty or negative; {example}")
        if total is not None and final >= total:
            raise _bad(key, value, f"has block {final}, but the model has {total} {key.split('_')[1]} blocks "
                                   f"(0-{total - 1}); use indices up to {total - 1}")
        chosen.update(range(first, final + 1))
    return frozenset(chosen)


def _parse_in_dims(value: str) -> tuple[int, ...]:
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [part.strip() for part in text.split(",")]
    fix = ("must be 5 whole numbers, 0 or more, for img, time, vector, guidance and txt; write it like "
           "in_dims=[4,0,0,0,4]")
    try:
        dims = tuple(int(part) for part in parts)
    except ValueError:
        raise _bad("in_dims", value, fix) from None
    if len(dims) != len(IN_LAYERS) or min(dims) < 0:
        raise _bad("in_dims", value, fix)
    return dims


def _parse_rank(key: str, value) -> int:
    try:
        rank = int(str(value).strip())
    except ValueError:
        rank = -1
    if rank < 0:
        raise _bad(key, value, f"must be a whole number, 0 or more; write it like {key}=8")
    return rank


def _truthy(value) -> bool:
    return value is not None and str(value).strip().lower() in _TRUE


def parse_flux_lora_args(network_args: Mapping[str, str], double_blocks: int | None = None,
                         single_blocks: int | None = None) -> FluxLoraArgs:
    """The FLUX.1 args of ``network_args`` (``{key: string}``); block counts, when known, bound the indices.
    Raises ConfigError naming network_args and the key."""
    train_blocks = str(network_args.get("train_blocks") or "all").strip().lower()
    if train_blocks not in TRAIN_BLOCKS:
        raise _bad("train_blocks", network_args.get("train_blocks"), "must be all, single or double")
    type_dims = tuple((identifier, _parse_rank(key, network_args[key])) for key, identifier in TYPE_DIMS
                      if network_args.get(key) not in (None, ""))
    counts = {"double": double_blocks, "single": single_blocks}
    blocks = tuple((kind, parse_block_selection(key, network_args[key], counts[kind]) if key in network_args else None)
                   for kind, key in INDEX_ARGS.items())
    in_dims = network_args.get("in_dims")
    return FluxLoraArgs(train_blocks=train_blocks, type_dims=type_dims, blocks=blocks,
                        in_dims=None if in_dims in (None, "") else _parse_in_dims(in_dims),
                        split_qkv=_truthy(network_args.get("split_qkv")),
                        train_t5xxl=_truthy(network_args.get("train_t5xxl")))


def flux_lora_arg_warnings(args: FluxLoraArgs, network_args: Mapping[str, str],
                           guidance_embed: bool = True) -> list[str]:
    """Args that do nothing with the others: block indices of a kind ``train_blocks`` leaves out, a guidance rank
    in ``in_dims`` on a model without a guidance embedding (schnell)."""
    found = Problems()
    for kind, key in INDEX_ARGS.items():
        if key in network_args and args.train_blocks not in ("all", kind):
            found.warn(f"{SETTING}: {key} does nothing with train_blocks={args.train_blocks} ({kind} blocks are not "
                       f"trained); remove it or set train_blocks=all")
    if args.in_dims and args.in_dims[IN_LAYERS.index("guidance_in")] and not guidance_embed:
        found.warn(f"{SETTING}: in_dims gives guidance_in a rank, but this model has no guidance embedding "
                   "(schnell); that rank is not used")
    return found.warnings
