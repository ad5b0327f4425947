"""Telling a FLUX.1 model from its key names and configs, without torch (preflight and the front end use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from sd_scripts.core.config import TrainConfig
from sd_scripts.models.checkpoint_io import SETTING, is_safetensors, load_error

__all__ = ["AIO_PREFIXES", "describe_flux", "is_flux_diffusers_folder", "is_flux_state"]

AIO_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer.",
                "ae": "vae."}


def is_flux_state(keys) -> bool:
    """True for a FLUX.1 transformer's keys (BFL layout, with or without ``model.diffusion_model.``)."""
    return any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in keys) and \
        any("single_blocks.0.linear1" in k for k in keys)


def is_flux_diffusers_folder(folder: Path, model_index: Mapping | None = None) -> bool:
    name = str((model_index or {}).get("_class_name", ""))
    return name.startswith("Flux") or (folder / "transformer" / "config.json").is_file() and \
        not (folder / "unet").is_dir()


def describe_flux(config: TrainConfig, info: dict, shapes: Mapping | None) -> dict:
    """Detection facts: ``flux_variant`` ("dev" | "schnell") and its source, and which parts the model file itself
    holds (``has_clip_l``, ``has_t5xxl``, ``has_ae``), and the transformer's ``double_blocks`` / ``single_blocks``."""
    if info["kind"] == "single_file":
        keys = list(shapes)
        has_guidance = any(k.endswith("guidance_in.in_layer.weight") for k in keys)
        parts = {name: any(k.startswith(prefix) for k in keys) for name, prefix in AIO_PREFIXES.items()}
        fmt = "safetensors" if is_safetensors(info["path"]) else "ckpt"
        blocks = [len({k.split(head + ".", 1)[1].split(".", 1)[0] for k in keys if head + "." in k})
                  for head in ("double_blocks", "single_blocks")]
    else:
        import json

        folder = Path(info["path"])
        try:
            transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise load_error(SETTING, f"{folder} has no readable transformer/config.json; give a complete FLUX.1 "
                                      "diffusers folder") from None
        has_guidance = bool(transformer.get("guidance_embeds"))
        blocks = [int(transformer.get("num_layers", 19)), int(transformer.get("num_single_layers", 38))]
        parts = {"clip_l": (folder / "text_encoder").is_dir(), "t5xxl": (folder / "text_encoder_2").is_dir(),
                 "ae": (folder / "vae").is_dir()}
        fmt = "diffusers"
    wanted = str(config.flux_variant or "").strip().lower()
    variant = wanted or ("dev" if has_guidance else "schnell")
    return {"format": fmt, "flux_variant": variant, "variant_source": "setting" if wanted else "model files",
            "guidance_embed": has_guidance, "v_parameterization": False, "v_source": "family",
            "trained_zero_terminal_snr": False, "has_clip_l": parts["clip_l"], "has_t5xxl": parts["t5xxl"],
            "has_ae": parts["ae"], "double_blocks": blocks[0], "single_blocks": blocks[1]}


