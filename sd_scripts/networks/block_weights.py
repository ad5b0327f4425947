"""kohya's block-wise LoRA settings: per-block learning-rate weights, ranks and alphas.

``network_args`` keys (kohya ``networks/lora.py``), all for the UNet only:

* ``down_lr_weight`` / ``up_lr_weight``: 12 comma-separated numbers (SDXL: 9), or a preset
  ``sine``, ``cosine``, ``linear``, ``reverse_linear``, ``zeros``, optionally ``+base``
  (``sine+0.5`` adds 0.5 to every value). ``mid_lr_weight``: 1 number (SDXL: 3).
  Weights at or below ``block_lr_zero_threshold`` (default 0) become 0. Each UNet block's
  parameters get their own optimizer group with ``unet_lr x weight``; a block with weight 0 is not
  trained and gets no LoRA modules at all.
* ``block_dims`` / ``block_alphas``: 25 values (SDXL: 23), rank and alpha of the Linear and 1x1
  layers of each block; ``conv_block_dims`` / ``conv_block_alphas`` the same for 3x3 convs (LoCon).
  A rank of 0 leaves the block out.

The 25 SD1/SD2 slots (kohya ``get_block_index``): slot 0 is unused (no LoRA); ``down_blocks.i``
resnets/attentions ``j`` -> ``1 + 3i + j``, its downsampler -> ``3 + 3i``; ``mid_block`` -> 12;
``up_blocks.i`` resnets/attentions ``j`` -> ``13 + 3i + j``, its upsampler -> ``15 + 3i``. The lr
vector is ``down (12) + mid (1) + up (12)``, so ``down_lr_weight[0]`` belongs to the empty slot 0.
SDXL uses 23 slots over the SGM ``input_blocks`` / ``middle_block`` / ``output_blocks`` (0 = time
embedding, 22 = ``out``), with the lr vector ``[1] + down (9) + mid (3) + up (9) + [1]``.

Where kohya silently ignores a setting, this module honours it: ``block_alphas`` or
``conv_block_dims`` given alone turn block mode on (kohya needs ``block_dims`` or an lr weight), and
``conv_block_alphas`` apply with ``conv_dim`` too. Lists of the wrong length are errors (kohya pads
short lr-weight lists with 1 and cuts long ones).

No torch import: preflight runs these checks before any model loads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.problems import Problems
from sd_scripts.networks.network_args import bad_arg, is_unset, parse_float, parse_float_list, parse_int_list

__all__ = [
    "BLOCK_ARG_KEYS", "LR_WEIGHT_KEYS", "LR_PRESETS", "BlockLayout", "SD_LAYOUT", "SDXL_LAYOUT", "layout_for_family",
    "BlockSettings", "lr_weight_preset", "resolve_block_settings",
]

LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_ARG_KEYS = LR_WEIGHT_KEYS + ("block_lr_zero_threshold",) + DIM_KEYS
LR_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")

_RE_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_RE_SDXL = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|out|time_embed|label_emb)_(\d+)")


@dataclass(frozen=True)
class BlockLayout:
    """How a model family's UNet splits into kohya's blocks."""

    name: str
    label: str  # for messages: "SD1/SD2"
    num_down: int  # values in down_lr_weight / up_lr_weight
    num_mid: int  # values in mid_lr_weight
    total: int  # values in block_dims and the other per-block lists
    pad_ends: bool  # SDXL: lr vector wrapped with 1.0 at both ends

    def block_index(self, lora_name: str) -> int | None:
        """The block slot of a UNet LoRA module name, or None for a module outside every block."""
        if self.name == "sdxl":
            return _sdxl_block_index(lora_name)
        return _sd_block_index(lora_name)

    def lr_vector(self, down: list[float], mid: list[float], up: list[float]) -> list[float]:
        vector = down + mid + up
        return [1.0] + vector + [1.0] if self.pad_ends else vector


def _sd_block_index(lora_name: str) -> int | None:
    if not lora_name.startswith("lora_unet_"):
        return None
    m = _RE_SD_UPDOWN.search(lora_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
        return 1 + idx if kind == "down" else 13 + idx
    if lora_name.startswith("lora_unet_mid_block_"):
        return 12
    return None


# SDXL in diffusers naming: down_blocks.i.{resnets,attentions}.j -> input_blocks[1 + 3i + j],
# down_blocks.i.downsamplers.0 -> input_blocks[3 + 3i]; mid_block resnets.0 / attentions.0 / resnets.1 ->
# middle_block[0 / 1 / 2]; up_blocks.i.{resnets,attentions}.j -> output_blocks[3i + j], upsamplers ->
# output_blocks[3i + 2]; conv_in = input_blocks[0], conv_out = out[2], time/add embeddings = slot 0.
def _sdxl_block_index(lora_name: str) -> int | None:
    if not lora_name.startswith("lora_unet_"):
        return None
    m = _RE_SDXL.match(lora_name)
    if m:
        part, n = m.group(1), int(m.group(2))
        return {"time_embed": 0, "label_emb": 0, "input_blocks": 1 + n, "middle_block": 10 + n,
                "output_blocks": 13 + n, "out": 22}[part]
    name = lora_name[len("lora_unet_"):]
    m = _RE_SD_UPDOWN.search(lora_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if kind == "down":
            return 1 + (3 + 3 * i if part == "downsamplers" else 1 + 3 * i + j)
        return 13 + (3 * i + 2 if part == "upsamplers" else 3 * i + j)
    m = re.match(r"mid_block_(resnets|attentions)_(\d+)_", name)
    if m:
        return 10 + (1 if m.group(1) == "attentions" else 2 * int(m.group(2)))
    if name.startswith("conv_in"):
        return 1
    if name.startswith(("conv_out", "conv_norm_out")):
        return 22
    if name.startswith(("time_embedding", "add_embedding")):
        return 0
    return None


SD_LAYOUT = BlockLayout("sd", "SD1/SD2", num_down=12, num_mid=1, total=25, pad_ends=False)
SDXL_LAYOUT = BlockLayout("sdxl", "SDXL", num_down=9, num_mid=3, total=23, pad_ends=True)
_LAYOUTS = {"sd1": SD_LAYOUT, "sd2": SD_LAYOUT, "sdxl": SDXL_LAYOUT}


def layout_for_family(family: Any) -> BlockLayout:
    """The block layout of a model family (object with ``.name``, or its name); SD1/SD2 when unknown."""
    if isinstance(family, BlockLayout):
        return family
    layout = getattr(family, "lora_block_layout", None)
    if isinstance(layout, BlockLayout):
        return layout
    name = getattr(family, "name", family)
    return _LAYOUTS.get(str(name).lower() if name is not None else "", SD_LAYOUT)


# --------------------------------------------------------------------------- lr weights

def lr_weight_preset(key: str, value: str, n: int) -> list[float]:
    """kohya's lr-weight presets over ``n`` values: ``sine`` rises 0 -> 1 as ``sin(pi/2 * i/(n-1))``,
    ``cosine`` is its reverse, ``linear`` rises ``i/(n-1)``, ``reverse_linear`` falls, ``zeros`` is 0;
    ``+base`` adds ``base`` to every value."""
    name, plus, base_text = value.strip().partition("+")
    name = name.strip().lower()
    base = 0.0
    if base_text.strip():
        base = parse_float(key, base_text.strip(), example="sine+0.5")
    elif plus:
        raise bad_arg(key, value, "has no number after +; write it like sine+0.5")
    steps = [i / (n - 1) for i in range(n)]
    if name == "sine":
        values = [math.sin(math.pi / 2 * s) for s in steps]
    elif name == "cosine":
        values = [math.sin(math.pi / 2 * s) for s in reversed(steps)]
    elif name == "linear":
        values = steps
    elif name == "reverse_linear":
        values = list(reversed(steps))
    elif name == "zeros":
        values = [0.0] * n
    else:
        raise bad_arg(key, value, f"is not a list of numbers or a preset; use {n} comma-separated numbers or one of "
                                  f"{', '.join(LR_PRESETS)} (optionally +base, like sine+0.5)")
    return [v + base for v in values]


def _is_preset(value: str) -> bool:
    text = value.strip()
    if "," in text:
        return False
    try:
        float(text)
        return False
    except ValueError:
        return True


def _lr_weight_list(key: str, value: Any, n: int, layout: BlockLayout, allow_preset: bool) -> list[float]:
    if allow_preset and isinstance(value, str) and _is_preset(value):
        return lr_weight_preset(key, value, n)
    values = parse_float_list(key, value, empty_as=0.0)
    if len(values) != n:
        extra = f" or a preset ({', '.join(LR_PRESETS)}, optionally +base)" if allow_preset else ""
        raise bad_arg(key, value, f"has {len(values)} value{'s' if len(values) != 1 else ''} but {layout.label} needs "
                                  f"{n}{extra}")
    return values


def _per_block_list(key: str, value: Any, layout: BlockLayout, ints: bool) -> list:
    values = parse_int_list(key, value, minimum=0) if ints else parse_float_list(key, value)
    if len(values) != layout.total:
        raise bad_arg(key, value, f"has {len(values)} value{'s' if len(values) != 1 else ''} but {layout.label} needs "
                                  f"{layout.total} (one per block, slot 0 first)")
    if not ints and any(v < 0 for v in values):
        raise bad_arg(key, value, "has a negative alpha; alphas are 0 (= rank) or more")
    return values


# --------------------------------------------------------------------------- settings

@dataclass
class BlockSettings:
    """Resolved block settings for one network (see the module docstring)."""

    layout: BlockLayout
    lr_weight: list[float] | None = None  # one per slot, or None (no per-block learning rates)
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    problems: Problems = field(default_factory=Problems)  # what resolving found (warnings; errors raise)

    @property
    def warnings(self) -> list[str]:
        return self.problems.warnings

    @property
    def has_dims(self) -> bool:
        return self.block_dims is not None

    @property
    def has_conv(self) -> bool:
        return self.conv_block_dims is not None

    def block_index(self, lora_name: str) -> int | None:
        return self.layout.block_index(lora_name)

    def dim_alpha(self, lora_name: str, is_conv3x3: bool) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a UNet module by its block; None when the module is outside every
        block (the caller uses the network-wide values) or, for a 3x3 conv, when no conv ranks are set."""
        idx = self.block_index(lora_name)
        if idx is None or self.block_dims is None:
            return None
        if not is_conv3x3:
            return self.block_dims[idx], self.block_alphas[idx]
        if self.conv_block_dims is None:
            return None
        return self.conv_block_dims[idx], self.conv_block_alphas[idx]

    def lr_weight_of(self, lora_name: str) -> float:
        idx = self.block_index(lora_name)
        if self.lr_weight is None or idx is None:
            return 1.0
        return self.lr_weight[idx]

    @staticmethod
    def group_name(idx: int | None) -> str:
        """TensorBoard name of a block's parameter group (kohya: ``unet_block<idx>``)."""
        return "unet" if idx is None else f"unet_block{idx}"


def resolve_block_settings(args: Mapping[str, Any], layout: BlockLayout, network_dim: int, network_alpha: float,
                           conv_dim: int | None = None, conv_alpha: float | None = None) -> BlockSettings | None:
    """Block settings from ``network_args`` (strings or values), or None when none of the block keys
    is given. Raises ConfigError naming network_args and the key for a bad value or length."""
    given = {k: args[k] for k in BLOCK_ARG_KEYS if k in args and not is_unset(args[k])}
    if not given:
        return None
    settings = BlockSettings(layout)
    if network_alpha is None:
        network_alpha = 1.0

    # ---- learning-rate weights
    if any(k in given for k in LR_WEIGHT_KEYS):
        down = (_lr_weight_list("down_lr_weight", given["down_lr_weight"], layout.num_down, layout, True)
                if "down_lr_weight" in given else [1.0] * layout.num_down)
        mid = (_lr_weight_list("mid_lr_weight", given["mid_lr_weight"], layout.num_mid, layout, False)
               if "mid_lr_weight" in given else [1.0] * layout.num_mid)
        up = (_lr_weight_list("up_lr_weight", given["up_lr_weight"], layout.num_down, layout, True)
              if "up_lr_weight" in given else [1.0] * layout.num_down)
        threshold = parse_float("block_lr_zero_threshold", given.get("block_lr_zero_threshold"), example="0.1") or 0.0
        settings.lr_weight = [w if w > threshold else 0.0 for w in layout.lr_vector(down, mid, up)]
        if all(w == 0 for w in settings.lr_weight):
            settings.problems.warn("network_args: every block lr weight is 0, so the UNet part does not train")
    elif "block_lr_zero_threshold" in given:
        parse_float("block_lr_zero_threshold", given["block_lr_zero_threshold"], example="0.1")
        settings.problems.warn("network_args: block_lr_zero_threshold does nothing without down_lr_weight, "
                                 "mid_lr_weight or up_lr_weight")

    # ---- per-block ranks and alphas
    block_dims = _per_block_list("block_dims", given["block_dims"], layout, True) if "block_dims" in given else None
    block_alphas = _per_block_list("block_alphas", given["block_alphas"], layout, False) if "block_alphas" in given else None
    conv_block_dims = (_per_block_list("conv_block_dims", given["conv_block_dims"], layout, True)
                       if "conv_block_dims" in given else None)
    conv_block_alphas = (_per_block_list("conv_block_alphas", given["conv_block_alphas"], layout, False)
                         if "conv_block_alphas" in given else None)
    if conv_block_alphas is not None and conv_block_dims is None and conv_dim is None:
        raise bad_arg("conv_block_alphas", given["conv_block_alphas"],
                      "needs conv_block_dims (or conv_dim) to say which 3x3 convs get a LoRA")

    settings.block_dims = block_dims or [int(network_dim)] * layout.total
    settings.block_alphas = block_alphas or [float(network_alpha)] * layout.total
    if conv_block_dims is not None or conv_dim is not None:
        settings.conv_block_dims = conv_block_dims or [int(conv_dim)] * layout.total
        default_conv_alpha = 1.0 if conv_alpha is None else float(conv_alpha)
        settings.conv_block_alphas = conv_block_alphas or [default_conv_alpha] * layout.total

    # A block that does not learn gets no modules (kohya remove_block_dims_and_alphas).
    if settings.lr_weight is not None:
        for i, w in enumerate(settings.lr_weight):
            if w == 0:
                settings.block_dims[i] = 0
                if settings.conv_block_dims is not None:
                    settings.conv_block_dims[i] = 0
    return settings
