"""SDXL UNet names: diffusers module paths <-> the original SGM/LDM layout that SDXL LoRA files use.

kohya trains SDXL on its own copy of the SAI UNet, so an SDXL LoRA names UNet layers by their SGM paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), not by diffusers' (``down_blocks.1.attentions.0...``).
We train on the diffusers ``UNet2DConditionModel`` and name each layer by its SGM path, which every consumer reads:
ComfyUI and A1111 map ``lora_unet_<LDM path>`` directly, diffusers remaps the SGM blocks with the UNet config.

The mapping is :func:`sd_scripts.models.ldm_convert.unet_ldm_name` (generic over block counts, so tiny and full-size
UNets alike):

* ``down_blocks.b.resnets.j`` / ``attentions.j`` -> ``input_blocks.i.0`` / ``input_blocks.i.1``, downsamplers ->
  ``input_blocks.i.0.op``; ``mid_block`` -> ``middle_block.0/1/2``; ``up_blocks`` -> ``output_blocks.i.0/1``,
  upsamplers -> ``output_blocks.i.2.conv`` (``.1.conv`` in a block without attention);
* resnet layers ``conv1``, ``time_emb_proj``, ``conv2``, ``conv_shortcut`` -> ``in_layers.2``, ``emb_layers.1``,
  ``out_layers.3``, ``skip_connection``; inside attention blocks the names are the same in both layouts.

:func:`lora_names_to_sgm` turns a file with diffusers-named UNet modules (``lora_unet_down_blocks_...``) into
kohya's SDXL names, as kohya's ``create_network_from_weights`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sd_scripts.models.ldm_convert import _unet_layout, unet_ldm_name

__all__ = [
    "diffusers_to_sgm_paths",
    "lora_names_to_sgm",
    "sgm_module_path",
    "sgm_path_mapper",
    "sgm_to_diffusers_paths",
]

_PREFIX = "lora_unet_"


def _config(unet_or_config) -> Any:
    return getattr(unet_or_config, "config", unet_or_config)


def sgm_module_path(path: str, unet_or_config) -> str:
    """SGM path of a diffusers UNet module path (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``).

    Raises KeyError for paths that have no SGM counterpart (containers such as ``down_blocks.0``).
    """
    return unet_ldm_name(path, _config(unet_or_config))


def sgm_path_mapper(unet_or_config) -> Callable[[str], str]:
    """A function ``diffusers module path -> SGM path`` for this UNet (its block layout computed once)."""
    config = _config(unet_or_config)
    layout = _unet_layout(config)

    def to_sgm(path: str) -> str:
        return unet_ldm_name(path, config, layout)

    return to_sgm


def diffusers_to_sgm_paths(unet) -> dict[str, str]:
    """``{diffusers path: SGM path}`` for every UNet module that holds weights directly (Linear, Conv, norms)."""
    to_sgm = sgm_path_mapper(unet)
    out: dict[str, str] = {}
    for path, module in unet.named_modules():
        if not path or not any(True for _ in module.parameters(recurse=False)):
            continue
        try:
            out[path] = to_sgm(path)
        except KeyError:
            continue
    return out


def sgm_to_diffusers_paths(unet) -> dict[str, str]:
    """``{SGM path: diffusers path}`` (the inverse of :func:`diffusers_to_sgm_paths`)."""
    return {sgm: path for path, sgm in diffusers_to_sgm_paths(unet).items()}


def lora_names_to_sgm(state_dict: Mapping[str, Any], unet) -> dict[str, Any]:
    """A kohya LoRA state dict with diffusers-named UNet modules renamed to kohya's SDXL (SGM) names.

    Keys already in SGM form, text-encoder keys and keys of unknown modules are kept as they are.
    """
    index = {_PREFIX + path.replace(".", "_"): _PREFIX + sgm.replace(".", "_")
             for path, sgm in diffusers_to_sgm_paths(unet).items()}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name, dot, rest = key.partition(".")
        out[index.get(name, name) + dot + rest] = value
    return out
