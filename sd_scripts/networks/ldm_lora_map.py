"""Which weight of a single-file (LDM/SGM layout) SD1/SD2/SDXL checkpoint each kohya LoRA module modifies.

Driven by the checkpoint's own keys, so it needs no model config and works for any block count and
layers per block (full-size and tiny models alike). The UNet's LDM paths are turned into the
diffusers paths kohya names its SD1/SD2 modules by (as kohya's model_util converts them, the inverse of
:func:`sd_scripts.models.ldm_convert.unet_ldm_name`):

* ``input_blocks.0.0`` -> ``conv_in``; ``time_embed.0/2`` -> ``time_embedding.linear_1/2``; ``out.0/2`` ->
  ``conv_norm_out/conv_out``;
* ``input_blocks.i.0`` / ``.1`` -> ``down_blocks.b.resnets.j`` / ``attentions.j``; ``input_blocks.i.0.op`` ->
  ``down_blocks.b.downsamplers.0.conv`` (blocks are delimited by their downsamplers);
* ``middle_block.0/1/2`` -> ``mid_block.resnets.0 / attentions.0 / resnets.1``;
* ``output_blocks.i.0`` / ``.1`` -> ``up_blocks.b.resnets.j`` / ``attentions.j``; ``output_blocks.i.{1,2}.conv`` ->
  ``up_blocks.b.upsamplers.0.conv`` (blocks end at their upsamplers);
* resnet internals ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection`` -> ``norm1``,
  ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``.

Text encoders: SD1 CLIP (``cond_stage_model.transformer[.text_model].*``) keeps HF names; SD2 OpenCLIP
(``cond_stage_model.model.transformer.resblocks.N.*``) packs q/k/v into ``attn.in_proj_weight``, so those
three modules modify a third of its rows each.

SDXL (family detected from the keys: ``conditioner.embedders.*``): kohya names SDXL UNet modules by their
SGM paths, which are the checkpoint's own ``model.diffusion_model.*`` paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), so every UNet weight maps 1:1 (norms and
``label_emb`` included, for LyCORIS full/norm modules); the diffusers spelling
(``lora_unet_down_blocks_1_attentions_0_...``) is accepted as an alias (``lora_target`` False, so it is
never counted or extracted twice). ``lora_te1_*`` is CLIP-L (``conditioner.embedders.0.transformer.text_model.*``,
HF names), ``lora_te2_*`` OpenCLIP bigG (``conditioner.embedders.1.model.transformer.resblocks.N.*``, packed
q/k/v as for SD2); every bigG block is a LoRA target (SDXL uses its last block through the pooled output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LdmTarget", "build_lora_map", "checkpoint_family", "clip_targets", "lora_target_names"]

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_PREFIX = "conditioner.embedders."

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_OPENCLIP = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}

# kohya's LoRA/LoCon targets (networks/lora.py): Linear/Conv children of Transformer2DModel, of
# ResnetBlock2D and of Down/Upsample2D; CLIPAttention / CLIPMLP linears.
_UNET_TARGET = re.compile(
    r"(attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"|resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    r"|(down|up)samplers\.0\.conv)$"
)
_TE_TARGET = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class LdmTarget:
    """The checkpoint weight (and bias) a module modifies; ``rows`` is a row range of a packed q/k/v weight."""

    name: str
    weight_key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    part: str  # "unet" or "te"
    lora_target: bool  # one of the layers kohya's LoRA/LoCon trains (what extraction covers)
    # a ResnetBlock2D / Down- or Upsample2D layer: kohya trains it only with conv_dim (LoCon), whatever the
    # module name's spelling (SDXL names are SGM paths, which do not say "resnets" / "samplers")
    conv_only: bool = False


def checkpoint_family(keys) -> str | None:
    """``"sd1"`` (CLIP text encoder), ``"sd2"`` (OpenCLIP), ``"sdxl"`` (SGM conditioner with two text encoders)
    or None, from an LDM checkpoint's keys."""
    has_unet = False
    family = None
    for key in keys:
        if key.startswith(UNET_PREFIX):
            has_unet = True
        if key.startswith(SDXL_PREFIX):
            family = "sdxl"
        elif key.startswith(OPENCLIP_PREFIX + "transformer.resblocks.") and family != "sdxl":
            family = "sd2"
        elif key.startswith(CLIP_PREFIX) and family is None:
            family = "sd1"
    return family if has_unet else None


def _block_tables(module_paths: set[str]) -> tuple[dict[int, tuple[int, int]], set[int], dict[int, tuple[int, int]]]:
    """``input index -> (down block, j)``, the input indices that are downsamplers, ``output index -> (up block, j)``."""
    ins = sorted({int(m[1]) for p in module_paths if (m := re.match(r"input_blocks\.(\d+)\.", p))})
    ops = {int(m[1]) for p in module_paths if (m := re.match(r"input_blocks\.(\d+)\.0\.op$", p))}
    down: dict[int, tuple[int, int]] = {}
    block, j = 0, 0
    for i in ins:
        if i == 0:
            continue
        if i in ops:
            down[i] = (block, -1)
            block, j = block + 1, 0
        else:
            down[i] = (block, j)
            j += 1
    outs = sorted({int(m[1]) for p in module_paths if (m := re.match(r"output_blocks\.(\d+)\.", p))})
    ups = {int(m[1]) for p in module_paths if (m := re.match(r"output_blocks\.(\d+)\.[12]\.conv$", p))}
    up: dict[int, tuple[int, int]] = {}
    block, j = 0, 0
    for i in outs:
        up[i] = (block, j)
        j += 1
        if i in ups:
            block, j = block + 1, 0
    return down, ops, up


def _unet_path(path: str, down, ops, up) -> str | None:
    """Diffusers module path of an LDM UNet module path, or None when it is not a UNet layer."""
    if path in _TOP:
        return _TOP[path]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        if i not in down:
            return None
        block, j = down[i]
        if i in ops:
            return f"down_blocks.{block}.downsamplers.0.conv" if rest == "op" else None
        if sub == 0:
            return f"down_blocks.{block}.resnets.{j}.{_RESNET.get(rest, rest)}"
        return f"down_blocks.{block}.attentions.{j}.{rest}"
    m = re.match(r"middle_block\.(\d)\.(.+)$", path)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{0 if sub == 0 else 1}.{_RESNET.get(rest, rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        if i not in up:
            return None
        block, j = up[i]
        if sub == 0:
            return f"up_blocks.{block}.resnets.{j}.{_RESNET.get(rest, rest)}"
        if rest == "conv":
            return f"up_blocks.{block}.upsamplers.0.conv"
        return f"up_blocks.{block}.attentions.{j}.{rest}"
    return None


def _name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def clip_targets(out: dict, keys, key_set, ckpt_prefix: str, lora_prefix: str) -> None:
    """HF-named CLIP text encoder weights (SD1, SDXL's CLIP-L)."""
    for key in keys:
        if not key.endswith(".weight") or not key.startswith(ckpt_prefix):
            continue
        path = key[len(ckpt_prefix):-len(".weight")]
        if path.startswith("text_model."):
            path = path[len("text_model."):]
        name = _name(lora_prefix, "text_model." + path)
        bias = key[: -len("weight")] + "bias"
        out[name] = LdmTarget(name, key, bias if bias in key_set else None, None, "te", bool(_TE_TARGET.search(path)))


def _openclip_targets(out: dict, shapes, keys, key_set, ckpt_prefix: str, lora_prefix: str, skip_last: bool) -> None:
    """OpenCLIP text encoder weights (SD2, SDXL's bigG): packed q/k/v as row ranges of ``in_proj_weight``."""
    layer = re.compile(re.escape(ckpt_prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    blocks = [int(m[1]) for k in keys if (m := layer.match(k))]
    last_block = str(max(blocks)) if blocks and skip_last else None
    for key in keys:
        m = layer.match(key)
        if not m:
            continue
        n, rest = m[1], m[2]
        if rest == "attn.in_proj_weight":
            shape = getattr(shapes[key], "shape", shapes[key])
            d = int(shape[0]) // 3
            bias = key[: -len("weight")] + "bias"
            for i, part in enumerate("qkv"):
                path = f"encoder.layers.{n}.self_attn.{part}_proj"
                name = _name(lora_prefix, "text_model." + path)
                out[name] = LdmTarget(name, key, bias if bias in key_set else None, (i * d, (i + 1) * d), "te",
                                      n != last_block)
            continue
        if not rest.endswith(".weight"):
            continue
        sub = rest[: -len(".weight")]
        if sub not in _OPENCLIP:
            continue
        path = f"encoder.layers.{n}.{_OPENCLIP[sub]}"
        name = _name(lora_prefix, "text_model." + path)
        bias = key[: -len("weight")] + "bias"
        out[name] = LdmTarget(name, key, bias if bias in key_set else None, None, "te",
                              n != last_block and bool(_TE_TARGET.search(path)))
    for sub, path in (("ln_final", "final_layer_norm"), ("token_embedding", "embeddings.token_embedding")):
        key = f"{ckpt_prefix}{sub}.weight"
        if key in key_set:
            name = _name(lora_prefix, "text_model." + path)
            bias = f"{ckpt_prefix}{sub}.bias"
            out[name] = LdmTarget(name, key, bias if bias in key_set else None, None, "te", False)


def build_lora_map(shapes: Mapping[str, tuple], family: str | None = None) -> dict[str, LdmTarget]:
    """``{kohya module name: LdmTarget}`` for every weight of an SD1/SD2/SDXL LDM checkpoint.

    ``shapes`` maps checkpoint keys to shapes (a state dict works too: only ``.shape`` of the
    packed OpenCLIP q/k/v weight is read). ``family`` defaults to :func:`checkpoint_family` of the keys."""
    out: dict[str, LdmTarget] = {}
    keys = list(shapes)
    key_set = set(keys)
    if family is None:
        family = checkpoint_family(keys)
    sdxl = family == "sdxl"
    unet_paths = {k[len(UNET_PREFIX):-len(".weight")] for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".weight")}
    down, ops, up = _block_tables(unet_paths)
    aliases: dict[str, LdmTarget] = {}
    for path in sorted(unet_paths):
        dpath = _unet_path(path, down, ops, up)
        if dpath is None and not sdxl:
            continue
        key = f"{UNET_PREFIX}{path}.weight"
        bias = f"{UNET_PREFIX}{path}.bias"
        bias = bias if bias in key_set else None
        is_target = dpath is not None and bool(_UNET_TARGET.search(dpath))
        conv_only = dpath is not None and ("resnets." in dpath or "samplers." in dpath)
        if sdxl:
            name = _name("lora_unet", path)
            out[name] = LdmTarget(name, key, bias, None, "unet", is_target, conv_only)
            if dpath is not None:
                alias = _name("lora_unet", dpath)
                aliases[alias] = LdmTarget(alias, key, bias, None, "unet", False, conv_only)
        else:
            name = _name("lora_unet", dpath)
            out[name] = LdmTarget(name, key, bias, None, "unet", is_target, conv_only)
    for alias, target in aliases.items():
        out.setdefault(alias, target)
    if sdxl:
        clip_targets(out, keys, key_set, SDXL_CLIP_PREFIX, "lora_te1")
        _openclip_targets(out, shapes, keys, key_set, SDXL_OPENCLIP_PREFIX, "lora_te2", skip_last=False)
        return out
    clip_targets(out, keys, key_set, CLIP_PREFIX, "lora_te")
    # The last OpenCLIP block is not part of the text encoder SD2 trains on (kohya drops it: its
    # output is never used with the penultimate layer), so it is mapped but not a LoRA target.
    _openclip_targets(out, shapes, keys, key_set, OPENCLIP_PREFIX, "lora_te", skip_last=True)
    return out


def lora_target_names(lora_map: Mapping[str, LdmTarget], conv: bool = True, text_encoder: bool = True,
                      shapes: Mapping[str, tuple] | None = None) -> list[str]:
    """The names kohya's LoRA (``conv=False``: the transformer blocks' layers only, as without ``conv_dim``) or
    LoCon (``conv=True``: also the resnets' and samplers' layers) trains."""
    names = []
    for name, target in lora_map.items():
        if not target.lora_target or (target.part == "te" and not text_encoder):
            continue
        if not conv and target.conv_only:
            continue
        if not conv and shapes is not None:
            shape = getattr(shapes[target.weight_key], "shape", shapes[target.weight_key])
            if len(shape) == 4 and any(int(k) > 1 for k in shape[2:]):
                continue
        names.append(name)
    return names
