"""Checks of the memory-saver settings that depend on the model: ``blocks_to_swap`` and
``cpu_offload_checkpointing`` (kohya's names), for preflight, before any model loads (their ranges and the
"needs gradient_checkpointing" rule are declared with the settings, ``core/settings.py`` and ``core/rules.py``).

Swapping blocks and offloading the checkpointed activations work on a transformer's list of blocks
(``models/block_swap.py``, ``models/checkpointing.py``): FLUX.1's. SD and SDXL UNets have no such list, so there
the settings are refused in one line rather than silently ignored.
"""

from __future__ import annotations

from typing import Mapping

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import UserError
from sd_scripts.core.problems import Problems

__all__ = ["memory_setting_problems"]


def memory_setting_problems(config: TrainConfig, family=None, info: Mapping | None = None,
                            problems: Problems | None = None) -> tuple[list[UserError], list[str]]:
    """The problems of ``blocks_to_swap`` and ``cpu_offload_checkpointing``, recorded in ``problems``; returns the
    ``(errors, warnings)`` found."""
    problems = Problems() if problems is None else problems
    found = len(problems.errors), len(problems.warnings)
    swap = config.blocks_to_swap or 0
    offload = bool(config.cpu_offload_checkpointing)
    is_flux = family is not None and getattr(family, "name", None) == "flux"
    if not isinstance(swap, int) or isinstance(swap, bool) or swap < 0:
        swap = 0  # the declared range check reports it
    if swap and family is not None and not is_flux:
        problems.error("blocks_to_swap", f"only FLUX.1 transformers swap blocks, this is {family.name}; set "
                       "blocks_to_swap 0 (gradient_checkpointing and fp8_base save memory there)")
    elif swap and is_flux:
        from sd_scripts.models.flux.memory import max_blocks_to_swap

        info = info or {}
        double, single = int(info.get("double_blocks") or 19), int(info.get("single_blocks") or 38)
        most = max_blocks_to_swap(double, single)
        if swap > most:
            problems.error("blocks_to_swap", f"{swap} is more than this model's {double} + {single} blocks allow; give "
                           f"at most {most}")
    if offload and family is not None and not is_flux:
        problems.error("cpu_offload_checkpointing", f"works on FLUX.1's transformer blocks, this is {family.name}; "
                       "turn it off")
    return problems.errors[found[0]:], problems.warnings[found[1]:]
