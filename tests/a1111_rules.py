"""AUTOMATIC1111's LoRA loader, reduced to its key rules, written here from the behaviour of
``extensions-builtin/Lora/networks.py`` (``convert_diffusers_name_to_compvis``, ``assign_network_names_to_compvis_modules``
and the lookup chain in ``load_network``). A1111 skips a key it cannot place with a debug log only, so a file with
unplaced keys loads "fine" and silently trains nothing there: the tests assert that nothing is left over.

A1111 names a layer after its module path in the LDM model with "." -> "_": ``diffusion_model_*`` for the UNet,
``transformer_text_model_*`` (SD1 CLIP) or ``model_transformer_resblocks_*`` (SD2 OpenCLIP) for the text encoder,
and on SDXL ``0_transformer_text_model_*`` / ``1_model_transformer_resblocks_*`` for the two conditioner embedders.
OpenCLIP attention is one ``nn.MultiheadAttention`` (packed ``in_proj``): q/k/v modules attach to it through
``re_x_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# networks.py suffix_conversion (diffusers resnet names -> LDM)
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _openclip_part(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    def suffix(kind: str, rest: str) -> str:
        return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest

    if m := re.fullmatch(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.fullmatch(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return (f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                f"{suffix(m[2], m[4])}")
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return (f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                f"{suffix(m[2], m[4])}")
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_openclip_part(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip_part(m[2])}"
    return key


def layer_mapping(checkpoint_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """``{A1111 layer name: weight shape}`` for the weighted modules of a single-file checkpoint, from its keys.

    A ``nn.MultiheadAttention`` (OpenCLIP ``attn.in_proj_weight``) is one layer whose q/k/v/out share the
    out_proj shape, as A1111's ``NetworkModule`` assumes.
    """
    layers: dict[str, tuple] = {}
    for key, shape in checkpoint_shapes.items():
        if key.startswith("model.diffusion_model."):
            path = key[len("model."):]
        elif key.startswith("cond_stage_model."):
            path = key[len("cond_stage_model."):]
        elif m := re.match(r"conditioner\.embedders\.(\d+)\.(.+)", key):
            path = f"{m[1]}.{m[2]}"
        else:
            continue
        if path.endswith(".in_proj_weight"):
            module = path[:-len(".in_proj_weight")]
            layers[module.replace(".", "_")] = checkpoint_shapes[key.replace("in_proj_weight", "out_proj.weight")]
        elif path.endswith(".weight"):
            layers[path[:-len(".weight")].replace(".", "_")] = tuple(shape)
    return layers


def load_network(state_dict: Mapping[str, object], layers: Mapping[str, tuple]) -> tuple[dict, dict]:
    """``load_network``'s lookup: (``{A1111 key: {network part: tensor}}``, ``{file key: key tried}`` for misses)."""
    is_sd2 = any(name.startswith("model_transformer_resblocks_") for name in layers)
    matched: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for key_network, weight in state_dict.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        found = key in layers
        if not found and (m := _X_PROJ.match(key)):
            found = m[1] in layers
        if not found and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            found = key in layers
        elif not found and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            found = key in layers
            if not found:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                found = key in layers
        if not found:
            failed[key_network] = key
            continue
        matched.setdefault(key, {})[part] = weight
    return matched, failed


def target_shape(key: str, layers: Mapping[str, tuple]) -> tuple:
    """The weight shape the module of A1111 key ``key`` changes (a q/k/v projection: the attention's)."""
    if key in layers:
        return tuple(layers[key])
    return tuple(layers[_X_PROJ.match(key)[1]])


def lora_delta_shape(weights: Mapping[str, object]) -> tuple | None:
    """Shape of up @ down for a LoRA/LoCon module (None for LyCORIS module types)."""
    if "lora_up.weight" not in weights:
        return None
    up, down = weights["lora_up.weight"], weights["lora_down.weight"]
    return (up.shape[0], *down.shape[1:])


def check_loads_completely(state_dict: Mapping[str, object], layers: Mapping[str, tuple]) -> dict[str, dict]:
    """Assert every key of ``state_dict`` lands on an A1111 layer and LoRA deltas have the layer's shape."""
    assert state_dict, "an empty file places nothing"
    matched, failed = load_network(state_dict, layers)
    assert failed == {}, f"A1111 leaves {len(failed)} keys unplaced, e.g. {sorted(failed.items())[:3]}"
    for key, weights in matched.items():
        shape = lora_delta_shape(weights)
        if shape is not None:
            assert shape == target_shape(key, layers), key
    return matched
