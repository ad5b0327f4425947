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


# ------------------------------------------------------------------------------------------------------------ FLUX.1
# comfy/lora.py (ComfyUI 0.3.x, checked against its source): model_lora_keys_unet maps every ``diffusion_model.*``
# weight of the model to ``lora_unet_<path with "." -> "_">`` (FLUX's model is BFL's layout, so kohya's FLUX names
# are these); model_lora_keys_clip maps the CLIP-L projections of ``clip_l.transformer.text_model.*`` to
# ``lora_te_`` / ``lora_te1_text_model_encoder_layers_<b>_<part>``, and every ``t5xxl.transformer.*`` weight to
# ``lora_te2_<path>`` (OneTrainer's FLUX files, when CLIP-L is there) and ``lora_te3_<path>`` (kohya's).
# load_lora then takes, per mapped name, these parts and warns "lora key not loaded" for every other key.
COMFY_LORA_PARTS = (
    "alpha", "dora_scale", "reshape_weight",
    "lora_up.weight", "lora_down.weight", "lora_mid.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "w_norm", "b_norm", "diff", "diff_b", "set_weight",
)


def comfy_key_map_flux(transformer_shapes: Mapping[str, tuple], clip_l_shapes: Mapping[str, tuple] | None = None,
                       t5_shapes: Mapping[str, tuple] | None = None) -> dict[str, tuple]:
    """ComfyUI's FLUX.1 key map -> target weight shapes. ``transformer_shapes``: BFL keys (no prefix);
    ``clip_l_shapes``: HF ``text_model.*`` names; ``t5_shapes``: ``T5EncoderModel`` names (``encoder.block.*``)."""
    key_map = {}
    for k, shape in transformer_shapes.items():
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[:-len(".weight")].replace(".", "_")] = tuple(shape)
    clip_l_present = False
    for b in range(32):
        for c, short in COMFY_LORA_CLIP_MAP.items():
            k = f"text_model.encoder.layers.{b}.{c}.weight"
            if clip_l_shapes and k in clip_l_shapes:
                for prefix in ("lora_te", "lora_te1"):
                    key_map[f"{prefix}_text_model_encoder_layers_{b}_{short}"] = tuple(clip_l_shapes[k])
                clip_l_present = True
    for k, shape in (t5_shapes or {}).items():
        if k.endswith(".weight"):
            path = k[:-len(".weight")].replace(".", "_")
            indices = (2, 3) if clip_l_present else (1,)
            for index in indices:
                key_map[f"lora_te{index}_{path}"] = tuple(shape)
    return key_map


def comfy_load_lora(state_dict: Mapping[str, object], key_map: Mapping[str, tuple]) -> tuple[dict[str, tuple], list[str]]:
    """ComfyUI's load_lora over ``key_map``: ``({module name: delta shape}, [keys not loaded])``. The delta shape is
    what ComfyUI reshapes onto the weight (``up @ down``, ``kron(w1, w2)``, ``(w1a w1b) * (w2a w2b)``)."""
    import torch

    loaded: set[str] = set()
    deltas: dict[str, tuple] = {}
    for name in key_map:
        parts = {p: state_dict[f"{name}.{p}"] for p in COMFY_LORA_PARTS if f"{name}.{p}" in state_dict}
        if not parts:
            continue
        loaded.update(f"{name}.{p}" for p in parts)
        if "lora_up.weight" in parts:
            up, down = parts["lora_up.weight"], parts["lora_down.weight"]
            deltas[name] = (up.shape[0], down.flatten(1).shape[1])
        elif "lokr_w1" in parts or "lokr_w1_a" in parts:
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
            w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            deltas[name] = tuple(torch.kron(w1.float(), w2.flatten(1).float()).shape)
        elif "hada_w1_a" in parts:
            deltas[name] = (parts["hada_w1_a"].shape[0], parts["hada_w1_b"].flatten(1).shape[1])
    return deltas, sorted(set(state_dict) - loaded)
