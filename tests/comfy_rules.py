"""ComfyUI's SDXL LoRA key rules (``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``), written here
from their behaviour: which kohya module names ComfyUI can place on an SDXL model, and the shape of the weight each
one changes. Shared by the SDXL LoRA file tests and the SDXL network-type trainings."""

from __future__ import annotations

from collections.abc import Mapping

COMFY_LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                       "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                       "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map_sdxl(ldm_unet_shapes: Mapping[str, tuple], clip_l_shapes: Mapping[str, tuple],
                       clip_g_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """ComfyUI's SDXL key map: ``lora_unet_<LDM path>`` for every ``diffusion_model.*`` weight, and ``lora_te1_`` /
    ``lora_te2_text_model_encoder_layers_<b>_<part>`` for the CLIP-L and CLIP-G (HF layout) projections. Values are
    the target weight shapes."""
    key_map = {}
    for k, shape in ldm_unet_shapes.items():
        if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")] = shape
    for prefix, shapes in (("lora_te1", clip_l_shapes), ("lora_te2", clip_g_shapes)):
        for b in range(32):
            for c, short in COMFY_LORA_CLIP_MAP.items():
                k = f"text_model.encoder.layers.{b}.{c}.weight"
                if k in shapes:
                    key_map[f"{prefix}_text_model_encoder_layers_{b}_{short}"] = shapes[k]
    return key_map


def hf_text_encoder_shapes(te) -> dict[str, tuple]:
    """Weight shapes of a transformers CLIP text encoder under its HF ``text_model.*`` names."""
    return {k if k.startswith("text_model.") else "text_model." + k: tuple(v.shape) for k, v in te.state_dict().items()}
