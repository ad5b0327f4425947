"""Which family a single-file checkpoint belongs to, and its kohya-module -> weight map: one entry point over
:mod:`ldm_lora_map` (SD1/SD2/SDXL) and :mod:`flux_lora_map` (FLUX.1) for the merge and extraction tools."""

from __future__ import annotations

from collections.abc import Mapping

from sd_scripts.networks.flux_lora_map import build_flux_lora_map, flux_layout
from sd_scripts.networks.ldm_lora_map import LdmTarget, build_lora_map, checkpoint_family

__all__ = ["CHECKPOINT_FAMILIES", "checkpoint_kind", "checkpoint_lora_map"]

CHECKPOINT_FAMILIES = ("sd1", "sd2", "sdxl", "flux")


def checkpoint_kind(keys) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"flux"`` or None, from a single-file checkpoint's keys."""
    keys = list(keys)
    if flux_layout(keys) is not None:
        return "flux"
    return checkpoint_family(keys)


def checkpoint_lora_map(shapes: Mapping[str, tuple], family: str | None = None) -> tuple[str | None, dict[str, LdmTarget]]:
    """``(family, {kohya module name: LdmTarget})`` for a checkpoint's keys (``shapes``: key -> shape or tensor)."""
    family = family or checkpoint_kind(shapes)
    if family == "flux":
        return family, build_flux_lora_map(shapes)
    return family, build_lora_map(shapes, family)
