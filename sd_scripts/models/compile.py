"""Speed options on the frozen denoiser: regional ``torch.compile`` and ``channels_last``.

* :func:`compile_repeated_blocks` (kohya's ``torch_compile`` + ``dynamo_backend``): compiles each of the
  denoiser's repeated blocks in place (``module.compile``), never the whole model. Copies of a block share one
  compiled code (dynamo inlines ``nn.Module`` calls and takes the weights as inputs), so compiling costs
  seconds per block kind rather than minutes for the model, and a block whose shape differs (another level of
  the UNet, sample images with their doubled batch) recompiles once with dynamic shapes. The LoRA/LyCORIS
  modules, injected before, are traced into the blocks' graphs; gradient checkpointing wraps the compiled
  blocks. State-dict keys do not change (no ``_orig_mod.`` prefix), so saving and resuming are unaffected.
* :func:`use_channels_last`: the 4-D convolution weights of the frozen model in NHWC (``channels_last``),
  which oneDNN (CPU) and cuDNN run faster for many convolutions; activations follow the weights' layout.
  The trained network's weights keep their own layout (files need contiguous tensors).
"""

from __future__ import annotations

from typing import Any

from sd_scripts.core.settings import declared_in_engine

__all__ = ["REPEATED_BLOCKS", "repeated_blocks", "compile_repeated_blocks", "inductor_options", "use_channels_last", "DYNAMO_BACKENDS"]

# class names of the repeated blocks, for denoisers that do not list theirs in diffusers' ``_repeated_blocks``
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "DoubleStreamBlock", "SingleStreamBlock")

# kohya's choices for ``dynamo_backend`` (torch.compile backends; those absent from this torch fail when used), as
# declared (sd_scripts/core/settings.py)
DYNAMO_BACKENDS = declared_in_engine("dynamo_backend").choices


def repeated_blocks(denoiser: Any, names: tuple[str, ...] | None = None) -> list:
    """The denoiser's modules whose class is a repeated block: diffusers' ``_repeated_blocks`` of the model and
    ``names`` (default :data:`REPEATED_BLOCKS`); outermost only (a block inside another listed block is compiled
    with it)."""
    wanted = set(REPEATED_BLOCKS if names is None else names) | set(getattr(denoiser, "_repeated_blocks", ()) or ())
    found: list = []
    inside: set[int] = set()
    for module in denoiser.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in wanted:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def inductor_options(backend: str, device_type: str, mode: str | None = None) -> dict | None:
    """Inductor settings for the device, or None. On a CPU, no layout optimization: inductor would otherwise put a
    model with convolutions in channels_last, which oneDNN runs slower than PyTorch's own pick for the UNet's
    shapes (``models/conv_paths.py``). Measured on a 2-core CPU (tiny UNet + LoRA, 64 px, batch 1, two rounds
    alternated in one process): compiled with it, 0.95x the eager step's CPU time; without it, 0.75x. A ``mode``
    (torch refuses both) keeps inductor's defaults."""
    if backend != "inductor" or device_type != "cpu" or mode:
        return None
    return {"layout_optimization": False}


def compile_repeated_blocks(denoiser: Any, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each repeated block of ``denoiser`` in place; returns how many. Call it after the network is
    injected (its modules are part of the traced code) and after the model reached its device and dtype."""
    import torch

    blocks = repeated_blocks(denoiser)
    device_type = next(denoiser.parameters()).device.type
    # each block kind meets several shapes (levels of the UNet, sample batches): room for their variants
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), 64))
    options = {"backend": backend}
    if mode:
        options["mode"] = mode
    inductor = inductor_options(backend, device_type, mode)
    if inductor:
        options["options"] = inductor
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def use_channels_last(model: Any) -> int:
    """Put the 4-D (convolution) weights of ``model`` in channels_last layout; returns how many tensors changed.
    Values are unchanged: only the memory order of the frozen weights."""
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.weight.dim() == 4:
            module.to(memory_format=torch.channels_last)
            changed += 1
    return changed
