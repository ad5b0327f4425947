"""Preflight checks of what is inside the files the settings name, read cheaply (headers, no weights): the CLIP
tokenizer offline, ``network_weights`` (a kohya LoRA), ``vae`` (a VAE) and the sample prompt file."""

from __future__ import annotations

import os
from pathlib import Path

from sd_scripts.core.errors import UserError
from sd_scripts.core.problems import Problems

__all__ = ["check_tokenizer_offline", "check_weight_files", "check_sample_prompt_file"]


def check_tokenizer_offline(config, family, info: dict, problems: Problems) -> None:
    """Offline, a missing CLIP tokenizer is known before any weight loads (online it is downloaded later)."""
    from sd_scripts.models import loading as ml

    if not ml._offline():
        return
    cache_dir = config.tokenizer_cache_dir
    for index, source in enumerate(getattr(family, "tokenizer_sources", None) or []):
        if info.get("kind") == "diffusers":
            sub = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            if ml._has_tokenizer_files(Path(info["path"]) / sub):
                continue
        if cache_dir:
            base = Path(os.path.expanduser(str(cache_dir)))
            if any(ml._has_tokenizer_files(c) for c in (base, base / source.cache_name, base / source.cache_name / "tokenizer")):
                continue
        try:
            found = ml._hub_tokenizer_folder(source, local_only=True)
        except Exception:  # noqa: BLE001 - not in the cache
            found = None
        if found is not None:
            continue
        problems.error("tokenizer_cache_dir", f"no {family.name} CLIP tokenizer found offline; set tokenizer_cache_dir "
                       f"to a folder holding the {source.repo_id} tokenizer (the folder itself or "
                       f"<dir>/{source.cache_name})")
        return


def check_weight_files(config, problems: Problems) -> None:
    """network_weights must be a kohya LoRA and vae a VAE; read from safetensors headers (cheap)."""
    from sd_scripts.models.loading import _read_safetensors_header

    weights = config.network_weights
    if weights and os.path.isfile(weights):
        from sd_scripts.files.lora_file import _read_header, load_lora_file

        try:
            header, _ = _read_header(Path(weights))
        except (OSError, ValueError, UnicodeDecodeError):
            header = None
        if header is not None:
            if not any(k.startswith(("lora_unet_", "lora_te")) for k in header if k != "__metadata__"):
                problems.error("network_weights", f"{weights} has no lora_unet_/lora_te_ keys, so it is not a kohya "
                               "LoRA file (a full model or a diffusers-format LoRA?); give a LoRA file to continue from")
        else:  # a .ckpt/.pt LoRA (small): loaded with weights_only
            with problems.collecting():
                load_lora_file(weights)
    vae = config.vae
    if vae and os.path.isdir(vae):
        if not (os.path.isfile(os.path.join(vae, "config.json")) or os.path.isfile(os.path.join(vae, "vae", "config.json"))):
            problems.error("vae", f"{vae} is not a diffusers VAE folder (no config.json or vae/config.json); give a VAE "
                           ".safetensors/.ckpt/.pt file or a diffusers folder")
    elif vae and os.path.isfile(vae) and vae.lower().endswith(".safetensors"):
        try:
            shapes, _ = _read_safetensors_header(vae, "vae")
        except UserError as e:
            problems.add(e)
        else:
            keys = [k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k for k in shapes]
            if not any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys):
                problems.error("vae", f"{vae} holds no VAE weights (encoder.*/decoder.*); give a VAE file or folder")


def check_sample_prompt_file(config, problems: Problems) -> None:
    """The sample prompt file parses and holds at least one prompt."""
    if not (config.sample_prompts and os.path.isfile(config.sample_prompts)):
        return
    from sd_scripts.training.sampling import load_sample_prompts

    try:
        prompts = load_sample_prompts(config.sample_prompts)
        if not prompts:
            problems.error("sample_prompts", f"{config.sample_prompts} holds no prompt; write one prompt per line")
    except UserError as e:
        problems.add(e)
    except (ValueError, TypeError, AttributeError) as e:  # a JSON prompt file of the wrong shape
        problems.error("sample_prompts", f"{config.sample_prompts} is not a list of prompts ({type(e).__name__}); "
                       "write one prompt per line")


