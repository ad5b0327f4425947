"""Checks of the memory-saver settings that depend on the model: ``blocks_to_swap`` and
``cpu_offload_checkpointing`` (kohya's names), for preflight, before any model loads (their ranges and the
"needs gradient_checkpointing" rule are declared with the settings, ``core/settings.py`` and ``core/rules.py``).

Swapping blocks and offloading the checkpointed activations work on a transformer's list of blocks
(``models/block_swap.py``, ``models/checkpointing.py``): FLUX.1's. SD and SDXL UNets have no such list, so there
the settings are refused in one line rather than silently ignored.
"""

from __future__ import annotations

from typing import Mapping

from sd_scripts.core.errors import ConfigError

__all__ = ["memory_setting_problems"]


def memory_setting_problems(config, family=None, info: Mapping | None = None) -> tuple[list, list[str]]:
    """``(errors, warnings)`` for ``blocks_to_swap`` and ``cpu_offload_checkpointing``."""
    errors: list = []
    warnings: list[str] = []
    swap = getattr(config, "blocks_to_swap", 0) or 0
    offload = bool(getattr(config, "cpu_offload_checkpointing", False))
    is_flux = family is not None and getattr(family, "name", None) == "flux"
    if not isinstance(swap, int) or isinstance(swap, bool) or swap < 0:
        swap = 0  # the declared range check reports it
    if swap and family is not None and not is_flux:
        errors.append(ConfigError(f"blocks_to_swap: only FLUX.1 transformers swap blocks, this is {family.name}; set "
                                  "blocks_to_swap 0 (gradient_checkpointing and fp8_base save memory there)",
                                  "blocks_to_swap"))
    elif swap and is_flux:
        from sd_scripts.models.flux.memory import max_blocks_to_swap

        info = info or {}
        double, single = int(info.get("double_blocks") or 19), int(info.get("single_blocks") or 38)
        most = max_blocks_to_swap(double, single)
        if swap > most:
            errors.append(ConfigError(f"blocks_to_swap: {swap} is more than this model's {double} + {single} blocks "
                                      f"allow; give at most {most}", "blocks_to_swap"))
    if offload and family is not None and not is_flux:
        errors.append(ConfigError(f"cpu_offload_checkpointing: works on FLUX.1's transformer blocks, this is "
                                  f"{family.name}; turn it off", "cpu_offload_checkpointing"))
    return errors, warnings
