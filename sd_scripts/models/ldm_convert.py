"""Diffusers -> LDM ("original Stable Diffusion") single-file key names, and the reverse for text encoders.

diffusers ships only LDM -> diffusers converters; this module is the other direction, generic over the UNet's
block counts and layers per block (read from its config), so it serves full-size and tiny models alike:

* UNet  -> ``model.diffusion_model.*``
* VAE   -> ``first_stage_model.*`` (mid-block attention weights reshaped to 1x1 convs)
* CLIP  -> ``cond_stage_model.transformer.text_model.*`` (``text_model.`` re-added for transformers' flattened names)
* OpenCLIP (SD2) -> ``cond_stage_model.model.*`` with q/k/v packed into ``in_proj_*``.
* SDXL: CLIP-L -> ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP bigG (all layers, with its
  ``text_projection`` stored transposed as OpenCLIP keeps it) -> ``conditioner.embedders.1.model.*``; the UNet's
  ``add_embedding`` -> ``label_emb.0``. SDXL checkpoints carry an SGM config (``network_config`` +
  ``conditioner_config``): :func:`sgm_config_from_diffusers` writes one, :func:`unet_config_from_sgm` reads one
  (diffusers' reader hard-codes the full-size time-embedding width, so tiny models need ours).

SD2 rule: an OpenCLIP checkpoint holds one more transformer block than the text encoder that trains on it (the
text encoder stops at the penultimate block, as kohya and SD2's "penultimate" layer setting do). The writer appends
a copy of the last block as that extra block (plus an identity ``text_projection`` and ``logit_scale``), and the
loader drops the last block, so ``diffusers -> LDM -> loaded`` gives back the same weights for any layer count.

Key maps (``unet_ldm_key_map`` and friends) give the LDM key of every diffusers parameter; LoRA tools use them to
merge LoRAs into single-file checkpoints. For OpenCLIP, q/k/v share one ``in_proj`` key: ``qkv_chunk_index(name)``
tells which third of its rows a parameter is.

The model configs written beside single files (LDM yaml, SDXL's SGM config) are in :mod:`.ldm_configs`
(importable from here too).
"""

from __future__ import annotations

import math
import re

from sd_scripts.models.ldm_configs import (
    config_value, ldm_config_from_diffusers, sgm_config_from_diffusers, sgm_v_prediction, unet_config_from_sgm,
)

__all__ = [
    "LDM_UNET_PREFIX",
    "LDM_VAE_PREFIX",
    "LDM_CLIP_PREFIX",
    "LDM_OPENCLIP_PREFIX",
    "LDM_SDXL_CLIP_PREFIX",
    "LDM_SDXL_OPENCLIP_PREFIX",
    "clip_from_ldm",
    "clip_to_ldm",
    "ldm_config_from_diffusers",
    "models_to_ldm",
    "openclip_from_ldm",
    "openclip_to_ldm",
    "qkv_chunk_index",
    "sgm_config_from_diffusers",
    "sgm_v_prediction",
    "text_encoder_ldm_key_map",
    "unet_ldm_key_map",
    "unet_ldm_name",
    "unet_config_from_sgm",
    "unet_to_ldm",
    "vae_ldm_key_map",
    "vae_ldm_name",
    "vae_to_ldm",
]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
LDM_SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
LDM_SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_NAMES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL-style conditioning embeddings (unused by SD1/SD2)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}




def _unet_config(unet_or_config):
    return getattr(unet_or_config, "config", unet_or_config)


def _unet_layout(config) -> dict:
    """Index tables of the LDM input/output blocks for a diffusers UNet config."""
    down_types = list(config_value(config, "down_block_types"))
    up_types = list(config_value(config, "up_block_types"))
    layers = config_value(config, "layers_per_block", 2)
    layers = [int(layers)] * len(down_types) if isinstance(layers, int) else [int(x) for x in layers]
    up_layers = [n + 1 for n in reversed(layers)]

    down_start, index = [], 1
    for b, n in enumerate(layers):
        down_start.append(index)
        index += n + (1 if b < len(layers) - 1 else 0)
    up_start, index = [], 0
    for n in up_layers:
        up_start.append(index)
        index += n
    return {"layers": layers, "up_layers": up_layers, "down_start": down_start, "up_start": up_start,
            "up_has_attention": ["CrossAttn" in t or "Attn" in t for t in up_types]}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_NAMES.get(head, head)}.{tail}" if tail else _RESNET_NAMES.get(head, head)


_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def unet_ldm_name(name: str, unet_config, layout: dict | None = None) -> str:
    """LDM name (without ``model.diffusion_model.``) of a diffusers UNet parameter or module path."""
    layout = layout or _unet_layout(_unet_config(unet_config))
    for diffusers, ldm in _UNET_TOP_NAMES.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return ldm + name[len(diffusers):]
    m = _DOWN.match(name)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        start = layout["down_start"][block]
        if kind == "resnets":
            return f"input_blocks.{start + j}.0.{_resnet_rest(rest)}"
        if kind == "attentions":
            return f"input_blocks.{start + j}.1.{rest}"
        rest = rest.replace("conv", "op", 1) if rest.startswith("conv") else rest
        return f"input_blocks.{start + layout['layers'][block]}.0.{rest}"
    m = _MID.match(name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{_resnet_rest(rest)}"
    m = _UP.match(name)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        start = layout["up_start"][block]
        if kind == "resnets":
            return f"output_blocks.{start + j}.0.{_resnet_rest(rest)}"
        if kind == "attentions":
            return f"output_blocks.{start + j}.1.{rest}"
        last = start + layout["up_layers"][block] - 1
        slot = 2 if layout["up_has_attention"][block] else 1
        return f"output_blocks.{last}.{slot}.{rest}"
    raise KeyError(f"no LDM name for UNet parameter {name!r}")


def unet_to_ldm(state_dict: dict, unet_config) -> dict:
    """Diffusers UNet state dict -> LDM keys (``model.diffusion_model.*``); tensors are shared, not copied."""
    layout = _unet_layout(_unet_config(unet_config))
    return {LDM_UNET_PREFIX + unet_ldm_name(k, unet_config, layout): v for k, v in state_dict.items()}


_VAE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$")
_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet_rest(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut", 1) if rest.startswith("conv_shortcut") else rest


def vae_ldm_name(name: str, num_up_blocks: int) -> str:
    """LDM name (without ``first_stage_model.``) of a diffusers ``AutoencoderKL`` parameter."""
    for part in ("encoder", "decoder"):
        if name.startswith(f"{part}.conv_norm_out."):
            return f"{part}.norm_out." + name.split(".", 2)[2]
    m = _VAE_DOWN.match(name)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"encoder.down.{block}.block.{j}.{_vae_resnet_rest(rest)}"
        return f"encoder.down.{block}.downsample.{rest}"
    m = _VAE_UP.match(name)
    if m:
        block, kind, j, rest = num_up_blocks - 1 - int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"decoder.up.{block}.block.{j}.{_vae_resnet_rest(rest)}"
        return f"decoder.up.{block}.upsample.{rest}"
    m = _VAE_MID.match(name)
    if m:
        part, kind, j, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{_vae_resnet_rest(rest)}"
        for diffusers, ldm in _VAE_ATTN.items():
            if rest.startswith(diffusers + "."):
                return f"{part}.mid.attn_1.{ldm}{rest[len(diffusers):]}"
        raise KeyError(f"no LDM name for VAE parameter {name!r}")
    return name  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_num_up_blocks(state_dict_or_config) -> int:
    if isinstance(state_dict_or_config, dict) and "up_block_types" not in state_dict_or_config:
        found = {int(m[1]) for k in state_dict_or_config if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
        return max(found) + 1
    return len(config_value(_unet_config(state_dict_or_config), "up_block_types"))


def vae_to_ldm(state_dict: dict) -> dict:
    """Diffusers VAE state dict -> LDM keys (``first_stage_model.*``), mid attention as 1x1 conv weights."""
    num_up = _vae_num_up_blocks(state_dict)
    out = {}
    for key, value in state_dict.items():
        ldm = vae_ldm_name(key, num_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[LDM_VAE_PREFIX + ldm] = value
    return out


def _strip_text_model(name: str) -> str:
    return name[len("text_model."):] if name.startswith("text_model.") else name


def clip_to_ldm(state_dict: dict, prefix: str = LDM_CLIP_PREFIX) -> dict:
    """HF ``CLIPTextModel`` state dict (flattened or not) -> ``<prefix>text_model.*`` (SD1: ``cond_stage_model.transformer.``)."""
    return {prefix + "text_model." + _strip_text_model(k): v
            for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_from_ldm(checkpoint: dict, prefix: str = LDM_CLIP_PREFIX) -> dict:
    """``cond_stage_model.transformer.*`` -> flattened HF CLIP names (``embeddings.*``, ``encoder.*``, ...)."""
    out = {}
    for key, value in checkpoint.items():
        if key.startswith(prefix) and not key.endswith("position_ids"):
            out[_strip_text_model(key[len(prefix):])] = value
    return out


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def qkv_chunk_index(name: str) -> int | None:
    """0/1/2 for a q/k/v projection parameter (its rows in OpenCLIP's packed ``in_proj``), else None."""
    m = _QKV.match(_strip_text_model(name))
    return "qkv".index(m[2]) if m else None


def _openclip_name(name: str) -> str:
    if name == "text_projection.weight":
        return "text_projection"  # stored transposed: OpenCLIP computes x @ text_projection
    name = _strip_text_model(name)
    if name in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[name]
    m = _QKV.match(name)
    if m:
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
    m = _LAYER.match(name)
    if m and m[2] in _OPENCLIP_LAYER:
        return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"
    raise KeyError(f"no OpenCLIP name for text encoder parameter {name!r}")


def openclip_to_ldm(state_dict: dict, add_dummy_last_layer: bool = True, prefix: str = LDM_OPENCLIP_PREFIX) -> dict:
    """HF CLIP text model (SD2's, gelu; SDXL's ``CLIPTextModelWithProjection``) -> OpenCLIP ``<prefix>*``.

    With ``add_dummy_last_layer`` (SD2) a copy of the last block is appended as the final (unused) block, and an
    identity ``text_projection`` and a ``logit_scale`` are written, so the file has OpenCLIP's full layout (see
    module doc). A model with its own projection (SDXL, ``prefix`` ``conditioner.embedders.1.model.``) keeps every
    block and writes ``text_projection`` transposed, plus a ``logit_scale``.
    """
    import torch

    state = {_strip_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict = {}
    packed: dict[str, list] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        ldm = prefix + _openclip_name(key)
        index = qkv_chunk_index(key)
        if index is None:
            out[ldm] = value
        else:
            packed.setdefault(ldm, [None, None, None])[index] = value
    for ldm, parts in packed.items():
        if any(p is None for p in parts):
            raise KeyError(f"incomplete q/k/v projection for {ldm}")
        out[ldm] = torch.cat(parts, dim=0)
    token = state["embeddings.token_embedding.weight"]
    if add_dummy_last_layer:
        layers = {int(m[1]) for k in state if (m := re.match(r"^encoder\.layers\.(\d+)\.", k))}
        last = max(layers)
        src, dst = f"transformer.resblocks.{last}.", f"transformer.resblocks.{last + 1}."
        for key in [k for k in out if k.startswith(prefix + src)]:
            out[key.replace(src, dst, 1)] = out[key].clone()
        if prefix + "text_projection" not in out:
            hidden = token.shape[1]
            out[prefix + "text_projection"] = torch.eye(hidden, dtype=token.dtype, device=token.device)
    if add_dummy_last_layer or prefix + "text_projection" in out:
        out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=token.dtype, device=token.device)
    return out


def openclip_from_ldm(checkpoint: dict, prefix: str = LDM_OPENCLIP_PREFIX, drop_last_layer: bool = True,
                      with_projection: bool = False) -> dict:
    """OpenCLIP ``<prefix>*`` -> flattened HF CLIP names.

    SD2 (``drop_last_layer``) drops the last block (see module doc); SDXL keeps every block and, ``with_projection``,
    gives ``text_projection.weight`` (the transposed OpenCLIP ``text_projection``) for ``CLIPTextModelWithProjection``.
    """
    state = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    blocks = {int(m[1]) for k in state if (m := re.match(r"^transformer\.resblocks\.(\d+)\.", k))}
    dropped = max(blocks) if (blocks and drop_last_layer) else None
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layer_names = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            m2 = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
            if m2 is None:
                if key == "text_projection" and with_projection:
                    out["text_projection.weight"] = value.T.contiguous()
                continue  # logit_scale, attn_mask (and text_projection without a projection): not used
            if int(m2[1]) == dropped:
                continue
            q, k, v = value.chunk(3, dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"encoder.layers.{m2[1]}.self_attn.{part}_proj.{m2[2]}"] = tensor
            continue
        block, name, kind = int(m[1]), m[2], m[3]
        if block == dropped:
            continue
        if name not in layer_names:
            raise KeyError(f"unexpected OpenCLIP key {prefix + key!r}")
        out[f"encoder.layers.{block}.{layer_names[name]}.{kind}"] = value
    return out


def models_to_ldm(unet, vae, text_encoder, text_encoder_kind: str = "clip") -> dict:
    """One LDM single-file state dict from diffusers/transformers modules.

    ``text_encoder_kind`` 'clip' (SD1), 'openclip' (SD2) or 'sdxl' (``text_encoder`` = ``[CLIP-L, OpenCLIP bigG with
    projection]``).
    """
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict()))
    if text_encoder_kind == "sdxl":
        te1, te2 = text_encoder
        out.update(clip_to_ldm(te1.state_dict(), LDM_SDXL_CLIP_PREFIX))
        out.update(openclip_to_ldm(te2.state_dict(), add_dummy_last_layer=False, prefix=LDM_SDXL_OPENCLIP_PREFIX))
    elif text_encoder_kind == "clip":
        out.update(clip_to_ldm(text_encoder.state_dict()))
    elif text_encoder_kind == "openclip":
        out.update(openclip_to_ldm(text_encoder.state_dict()))
    else:
        raise ValueError(f"unknown text encoder kind {text_encoder_kind!r}")
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- key maps


def _meta_parameter_names(cls, config) -> list[str]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return list(model.state_dict().keys())


def _parameter_names(model_or_config, class_name: str, config) -> list[str]:
    """Parameter names of a live diffusers model, or of one built from ``config`` on the meta device."""
    if hasattr(model_or_config, "state_dict"):
        return list(model_or_config.state_dict().keys())
    import diffusers

    return _meta_parameter_names(getattr(diffusers, class_name), dict(config))


def unet_ldm_key_map(unet_or_config) -> dict[str, str]:
    """``{diffusers parameter name: LDM checkpoint key}`` for a UNet (model or config; built on the meta device)."""
    config = _unet_config(unet_or_config)
    names = _parameter_names(unet_or_config, "UNet2DConditionModel", config)
    layout = _unet_layout(config)
    return {n: LDM_UNET_PREFIX + unet_ldm_name(n, config, layout) for n in names}


def vae_ldm_key_map(vae_or_config) -> dict[str, str]:
    """``{diffusers parameter name: LDM checkpoint key}`` for an ``AutoencoderKL`` (mid attention differs in shape)."""
    config = _unet_config(vae_or_config)
    names = _parameter_names(vae_or_config, "AutoencoderKL", config)
    num_up = len(config_value(config, "up_block_types"))
    return {n: LDM_VAE_PREFIX + vae_ldm_name(n, num_up) for n in names}


def text_encoder_ldm_key_map(text_encoder_or_config, kind: str = "clip", prefix: str | None = None) -> dict[str, str]:
    """``{parameter name as the model names it: LDM key}`` for a CLIP text encoder.

    ``kind`` 'clip' (SD1: ``cond_stage_model.transformer.text_model.*``) or 'openclip' (SD2:
    ``cond_stage_model.model.*``, where q/k/v map to one ``in_proj`` key: see ``qkv_chunk_index``). ``prefix``
    overrides the LDM prefix (SDXL: ``LDM_SDXL_CLIP_PREFIX`` / ``LDM_SDXL_OPENCLIP_PREFIX``; OpenCLIP's
    ``text_projection`` is stored transposed).
    """
    if hasattr(text_encoder_or_config, "state_dict"):
        names = list(text_encoder_or_config.state_dict().keys())
    else:
        from transformers import CLIPTextModel

        names = _meta_parameter_names(CLIPTextModel, text_encoder_or_config)
    names = [n for n in names if not n.endswith("position_ids")]
    if kind == "clip":
        prefix = LDM_CLIP_PREFIX if prefix is None else prefix
        return {n: prefix + "text_model." + _strip_text_model(n) for n in names}
    if kind == "openclip":
        prefix = LDM_OPENCLIP_PREFIX if prefix is None else prefix
        return {n: prefix + _openclip_name(n) for n in names}
    raise ValueError(f"unknown text encoder kind {kind!r}")
