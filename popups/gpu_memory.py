"""GPU memory recipes for the training wizard: one answer sets the memory settings known to fit a card.

``MEMORY_RECIPES`` holds, per model family (SD 1.x/2.x share one table, SDXL and FLUX.1 have their own), the
ArgStore values of each answer. The FLUX.1 recipes are the community's figures (kohya's FLUX.1 guide: with
``fp8_base``, 24 GB trains at batch 2, 16 GB at batch 1 with some blocks swapped, 12 GB with ``blocks_to_swap 16``
and 8-bit AdamW), not measured here yet: their labels say so. :func:`plan_recipe` turns an answer into changes: a setting still at its ``ArgsList.py`` default is the
recipe's to set, any other value is the user's own (command line, JSON file, an earlier answer) and stays; a change
that would clash with other settings is left out, with one line saying why. :func:`probe_gpu` reads the card's
memory without importing torch (``nvidia-smi``), or from ``torch.cuda`` when torch is already loaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

from sd_scripts.core.settings import front_settings

__all__ = ["KEEP", "MEMORY_LABELS", "MEMORY_RECIPES", "changing_captions", "managed_settings", "plan_recipe", "probe_gpu",
           "recipe_family", "suggested_answer"]

KEEP = "keep"

# answer -> ArgStore values, in the order they are listed; every recipe of a family names the same switches so a
# changed answer turns off what the previous one turned on
MEMORY_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "sd": {
        "6gb": dict(gradient_checkpointing=True, cache_latents=True, batch_size=1, optimizer_type="AdamW8bit",
                    mixed_precision="fp16"),
        "8gb": dict(gradient_checkpointing=False, cache_latents=True, batch_size=2),
        "16gb": dict(gradient_checkpointing=False, cache_latents=True, batch_size=4),
    },
    "sdxl": {
        "8gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                    cache_text_encoder_outputs=True, fp8_base=True, batch_size=1, optimizer_type="AdamW8bit",
                    mixed_precision="bf16", no_half_vae=True),
        "12gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=False, unet_only=True,
                     cache_text_encoder_outputs=True, fp8_base=False, batch_size=1, optimizer_type="AdamW8bit",
                     mixed_precision="bf16", no_half_vae=False),
        "16gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=False, unet_only=False,
                     cache_text_encoder_outputs=False, fp8_base=False, batch_size=2, mixed_precision="bf16",
                     no_half_vae=False),
        "24gb": dict(gradient_checkpointing=False, cache_latents=True, cache_latents_to_disk=False, unet_only=False,
                     cache_text_encoder_outputs=False, fp8_base=False, batch_size=4, mixed_precision="bf16",
                     no_half_vae=False),
    },
    "flux": {
        "12gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                     cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=16, batch_size=1,
                     optimizer_type="AdamW8bit", mixed_precision="bf16"),
        "16gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=True, unet_only=True,
                     cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=8, batch_size=1,
                     optimizer_type="AdamW8bit", mixed_precision="bf16"),
        "24gb": dict(gradient_checkpointing=True, cache_latents=True, cache_latents_to_disk=False, unet_only=True,
                     cache_text_encoder_outputs=True, fp8_base=True, blocks_to_swap=0, batch_size=2,
                     mixed_precision="bf16"),
    },
}
COMMUNITY_FIGURES = "community figures (kohya's FLUX.1 guide), not measured here yet"
MEMORY_LABELS: dict[str, dict[str, str]] = {
    "sd": {
        KEEP: "Keep my settings (change nothing)",
        "6gb": "6 GB or less: gradient checkpointing, batch size 1, 8-bit AdamW, fp16",
        "8gb": "8 to 12 GB: batch size 2",
        "16gb": "16 GB or more: batch size 4",
    },
    "sdxl": {
        KEEP: "Keep my settings (change nothing)",
        "8gb": "8 GB: UNet only, float8 model, gradient checkpointing, batch size 1, bf16",
        "12gb": "12 GB: UNet only, gradient checkpointing, batch size 1, bf16",
        "16gb": "16 GB: gradient checkpointing, batch size 2, bf16",
        "24gb": "24 GB or more: batch size 4, bf16",
    },
    "flux": {
        KEEP: "Keep my settings (change nothing)",
        "12gb": f"12 GB: float8 model, 16 blocks swapped to the CPU, 8-bit AdamW, batch size 1 ({COMMUNITY_FIGURES})",
        "16gb": f"16 GB: float8 model, 8 blocks swapped to the CPU, 8-bit AdamW, batch size 1 ({COMMUNITY_FIGURES})",
        "24gb": f"24 GB or more: float8 model, batch size 2 ({COMMUNITY_FIGURES})",
    },
}
# the smallest card (GiB as the driver reports it, a little under the box's GB) each answer is for
_THRESHOLDS = {"sd": (("16gb", 15.0), ("8gb", 7.0), ("6gb", 0.0)),
               "sdxl": (("24gb", 20.0), ("16gb", 14.0), ("12gb", 9.5), ("8gb", 0.0)),
               "flux": (("24gb", 20.0), ("16gb", 14.0), ("12gb", 0.0))}
# the settings declared to change captions from step to step (sd_scripts/core/settings.py)
_CAPTION_CHANGERS = tuple(s.name for s in front_settings() if s.changes_captions)


def recipe_family(model_type: str) -> str:
    """The recipe table of a wizard model type: ``sdxl``, ``flux``, or ``sd`` for SD 1.x and 2.x."""
    return model_type if model_type in ("sdxl", "flux") else "sd"


def managed_settings(family: str) -> list[str]:
    """Every setting some recipe of ``family`` sets, in a stable order."""
    names: dict[str, None] = {}
    for recipe in MEMORY_RECIPES[family].values():
        names.update(dict.fromkeys(recipe))
    return list(names)


def suggested_answer(family: str, gib: float) -> str:
    """The recipe for a card of ``gib`` GiB."""
    for answer, smallest in _THRESHOLDS[family]:
        if gib >= smallest:
            return answer
    return _THRESHOLDS[family][-1][0]


def probe_gpu() -> tuple[str, float] | None:
    """``(name, memory in GiB)`` of the first CUDA GPU, or None when there is none (or it cannot be told).

    torch is asked only when something already imported it: the wizard itself never loads torch (it takes seconds).
    Otherwise ``nvidia-smi``, which every NVIDIA driver installs, answers in a fraction of a second.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if not torch.cuda.is_available():
                return None
            props = torch.cuda.get_device_properties(0)
            return str(props.name), props.total_memory / 2**30
        except Exception:  # a broken CUDA setup: the wizard goes on without a suggestion
            return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        name, mib = out.strip().splitlines()[0].rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def changing_captions(store: Any) -> list[str]:
    """The settings that make captions change during training (they rule out the text-encoder output cache)."""
    return [name for name in _CAPTION_CHANGERS if getattr(store, name, None)]


def plan_recipe(store: Any, family: str, answer: str) -> tuple[dict[str, Any], list[str]]:
    """The changes recipe ``answer`` makes to ``store``, and one line for each change it leaves out and why.

    Only settings at their ``ArgsList.py`` default change. Left out: ``cache_latents`` with random crops or colour
    augmentation, ``cache_latents_to_disk`` without the latent cache, ``unet_only`` with ``text_only``, the
    text-encoder output cache without UNet-only training or with captions that change during training, ``unet_only``
    off while that cache stays on, ``fp8_base`` without fp16/bf16, and ``mixed_precision`` pinned by ``full_fp16`` /
    ``full_bf16``.
    """
    from ArgsList import ArgStore

    if answer == KEEP:
        return {}, []
    defaults = {info.name: info.default for info in ArgStore.settings()}
    recipe = MEMORY_RECIPES[family][answer]
    changes: dict[str, Any] = {}
    skipped: list[str] = []

    def final(name: str) -> Any:
        return changes.get(name, getattr(store, name))

    def offer(name: str, why_not: str | None = None) -> None:
        value = recipe[name]
        current = getattr(store, name)
        if value == current or current != defaults[name]:
            return  # already so, or the user's own value
        if why_not:
            skipped.append(f"{name} {_shown(value)} left out: {why_not}")
            return
        changes[name] = value

    def offer_if_in_recipe(name: str, why_not: str | None = None) -> None:
        if name in recipe:
            offer(name, why_not)

    pinned = "full_fp16" if store.full_fp16 else "full_bf16" if store.full_bf16 else None
    offer_if_in_recipe("mixed_precision", f"{pinned} needs {store.mixed_precision}" if pinned else None)
    for name in ("batch_size", "optimizer_type", "gradient_checkpointing", "no_half_vae", "blocks_to_swap"):
        offer_if_in_recipe(name)
    augment = "random_crop" if store.random_crop else "color_aug" if store.color_aug else None
    offer_if_in_recipe("cache_latents", f"{augment} needs the images encoded each step" if augment else None)
    offer_if_in_recipe("cache_latents_to_disk", None if final("cache_latents") else "the latent cache is off")
    te_cache_on = store.cache_text_encoder_outputs or store.cache_text_encoder_outputs_to_disk
    if recipe.get("unet_only") is True:
        offer("unet_only", "text_only is on" if store.text_only else None)
    elif "unet_only" in recipe:
        offer("unet_only", "the text-encoder output cache is on" if te_cache_on else None)
    if recipe.get("cache_text_encoder_outputs") is True:
        changing = changing_captions(store)
        why = ("the captions change during training (" + ", ".join(changing) + ")" if changing else
               None if final("unet_only") else "it needs UNet-only training")
        offer("cache_text_encoder_outputs", why)
    elif "cache_text_encoder_outputs" in recipe:
        offer("cache_text_encoder_outputs",
              "cache_text_encoder_outputs_to_disk is on" if store.cache_text_encoder_outputs_to_disk else None)
    if recipe.get("fp8_base") is True:
        offer("fp8_base", None if final("mixed_precision") in ("fp16", "bf16") else "it needs mixed_precision fp16 "
              "or bf16")
    elif "fp8_base" in recipe:
        offer("fp8_base")
    return changes, skipped


def _shown(value: Any) -> str:
    return "on" if value is True else "off" if value is False else str(value)
