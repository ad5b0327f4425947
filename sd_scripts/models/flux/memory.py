"""The memory savers on the FLUX.1 transformer: kohya's ``blocks_to_swap`` count, ``fp8_base``, gradient
checkpointing (with ``cpu_offload_checkpointing``), over the model-agnostic pieces in ``models/block_swap.py``,
``models/checkpointing.py`` and ``models/fp8.py``.

``blocks_to_swap N`` counts as kohya's ``flux_models.enable_block_swap`` does: ``N // 2`` double-stream blocks (each
about twice a single block's size) and ``2 * (N - N // 2)`` single-stream blocks, so N is roughly the number of
single-block-sized units swapped (kohya's largest, 35: 17 double and 36 single blocks). Which blocks: the double
blocks after the first and the single blocks before the last, so the first copy overlaps the first block's compute
and the backward pass starts on a block that is already there. Unlike kohya's, it combines with
``cpu_offload_checkpointing``.
"""

from __future__ import annotations

import torch

from sd_scripts.models.block_swap import BlockSwap
from sd_scripts.models.fp8 import store_linear_weights_fp8

__all__ = ["flux_swap_counts", "flux_swap_indices", "fp8_weight_keys", "max_blocks_to_swap",
           "prepare_flux_transformer", "store_flux_weights_fp8"]


def flux_swap_counts(blocks_to_swap: int) -> tuple[int, int]:
    """``(double, single)`` blocks swapped for kohya's ``blocks_to_swap``."""
    double = int(blocks_to_swap) // 2
    return double, (int(blocks_to_swap) - double) * 2


def max_blocks_to_swap(depth: int, depth_single_blocks: int) -> int:
    """The largest ``blocks_to_swap`` a transformer of these block counts takes (35 or 36 for FLUX.1's 19 + 38)."""
    n = 0
    while True:
        double, single = flux_swap_counts(n + 1)
        if double > depth - 1 or single > depth_single_blocks - 1:
            return n
        n += 1


def flux_swap_indices(depth: int, depth_single_blocks: int, blocks_to_swap: int) -> list[int]:
    """Indices into ``transformer.blocks`` (double blocks, then single blocks) of the blocks to swap; ValueError
    when there are not that many."""
    double, single = flux_swap_counts(blocks_to_swap)
    if blocks_to_swap < 0 or double > depth - 1 or single > depth_single_blocks - 1:
        raise ValueError(f"blocks_to_swap {blocks_to_swap} is more than this model has "
                         f"(at most {max_blocks_to_swap(depth, depth_single_blocks)})")
    return list(range(1, 1 + double)) + [depth + j for j in range(single)]


def fp8_weight_keys(params) -> set[str]:
    """The state-dict keys :func:`store_flux_weights_fp8` stores in float8 (a loader casts them as they are read)."""
    from sd_scripts.models.flux.transformer import FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(params)
    keys = set()
    for head in ("double_blocks", "single_blocks"):
        for name, module in getattr(model, head).named_modules():
            if type(module) is torch.nn.Linear:
                keys.add(f"{head}.{name}.weight")
    return keys


def store_flux_weights_fp8(transformer) -> int:
    """``fp8_base``: the block linears in float8 (the embedders and the final layer, 0.3% of the weights, keep their
    dtype, as the inputs and outputs are most sensitive to rounding). Call before a network is attached."""
    count = 0
    for block in transformer.blocks:
        count += store_linear_weights_fp8(block)
    return count


def prepare_flux_transformer(transformer, device, *, blocks_to_swap: int = 0, gradient_checkpointing: bool = False,
                             cpu_offload_checkpointing: bool = False, prefetch: int = 1) -> BlockSwap | None:
    """Put a frozen FLUX.1 transformer on ``device`` for training: checkpointing on its blocks when asked, and with
    ``blocks_to_swap`` the swapped blocks kept in CPU memory (never copied to the device whole: the model may not fit
    there). Does not change any dtype (float8 storage stays). Returns the :class:`BlockSwap` (None without swap)."""
    device = torch.device(device)
    blocks = transformer.blocks
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing(cpu_offload=cpu_offload_checkpointing)
    else:
        transformer.disable_gradient_checkpointing()
    swapped = flux_swap_indices(len(transformer.double_blocks), len(transformer.single_blocks), blocks_to_swap) \
        if blocks_to_swap else []
    swapped_set = {id(blocks[i]) for i in swapped}
    for module in transformer.children():  # everything but the swapped blocks goes to the device
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if id(block) not in swapped_set:
                    block.to(device)
        else:
            module.to(device)
    for name, t in list(transformer.named_parameters(recurse=False)) + list(transformer.named_buffers(recurse=False)):
        t.data = t.data.to(device)
    if not swapped:
        return None
    return BlockSwap(blocks, swapped, device, prefetch=prefetch)
