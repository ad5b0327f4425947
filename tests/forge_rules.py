"""Forge's FLUX.1 LoRA key rules, written here from its source (``backend/patcher/lora.py`` and the ComfyUI rules it
carries in ``packages_3rdparty/comfyui_lora_collection/lora.py``).

The transformer: every ``diffusion_model.*`` weight as ``lora_unet_<BFL path with "." -> "_">`` (as ComfyUI; Forge's
FLUX model is BFL's layout too), plus diffusers' ``transformer.*`` names. CLIP-L: ``lora_te_`` / ``lora_te1_`` on the
six CLIP projections. T5-XXL: ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` + the T5 path (Forge adds all three to the
collection's ``lora_te3_``). A key its loader does not take comes back in the "remaining" dict and is not applied.
Forge's load_lora takes the same parts as ComfyUI's (minus ``reshape_weight`` and ``set_weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

from tests.comfy_rules import COMFY_LORA_CLIP_MAP, COMFY_LORA_PARTS, comfy_load_lora

FORGE_LORA_PARTS = tuple(p for p in COMFY_LORA_PARTS if p not in ("reshape_weight", "set_weight"))


def forge_key_map_flux(transformer_shapes: Mapping[str, tuple], clip_l_shapes: Mapping[str, tuple] | None = None,
                       t5_shapes: Mapping[str, tuple] | None = None) -> dict[str, tuple]:
    key_map = {}
    for k, shape in transformer_shapes.items():
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[:-len(".weight")].replace(".", "_")] = tuple(shape)
    for b in range(32):
        for c, short in COMFY_LORA_CLIP_MAP.items():
            k = f"text_model.encoder.layers.{b}.{c}.weight"
            if clip_l_shapes and k in clip_l_shapes:
                for prefix in ("lora_te", "lora_te1"):
                    key_map[f"{prefix}_text_model_encoder_layers_{b}_{short}"] = tuple(clip_l_shapes[k])
    for k, shape in (t5_shapes or {}).items():
        if k.endswith(".weight"):
            for prefix in ("lora_te1", "lora_te2", "lora_te3"):
                key_map[f"{prefix}_{k[:-len('.weight')].replace('.', '_')}"] = tuple(shape)
    return key_map


def forge_load_lora(state_dict: Mapping[str, object], key_map: Mapping[str, tuple]) -> tuple[dict[str, tuple], list[str]]:
    """Forge's load_lora: ``({module name: delta shape}, [remaining keys])``."""
    unsupported = {k for k in state_dict if k.rsplit(".", 1)[-1] in ("reshape_weight", "set_weight")}
    deltas, left = comfy_load_lora({k: v for k, v in state_dict.items() if k not in unsupported}, key_map)
    return deltas, sorted(set(left) | unsupported)
