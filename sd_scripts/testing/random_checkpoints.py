"""Big random checkpoints written one tensor at a time (benchmarks and memory tests; the engine never imports this).

A full-size FLUX.1 transformer is 24 GB in bf16: building it as a state dict first would need that much RAM. Here
the shapes come from a model built on the ``meta`` device (no memory) and each tensor is drawn and written alone, so
writing the file needs about one tensor's worth of memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["meta_state_shapes", "write_random_checkpoint"]


def meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of ``build()``'s state dict with the model built on the meta device."""
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random_checkpoint(path, shapes: Mapping[str, tuple[int, ...]], dtype=None, seed: int = 0, std: float = 0.02,
                            metadata: Mapping[str, str] | None = None) -> int:
    """Write normal(0, ``std``) tensors of ``shapes`` (``dtype``: bfloat16 by default) to a .safetensors file at
    ``path``, one tensor in memory at a time; returns the file's size in bytes."""
    import torch

    from sd_scripts.files.safetensors_stream import SafetensorsWriter

    dtype = dtype or torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, [(k, dtype, s) for k, s in shapes.items()], metadata) as writer:
        for key in writer.order:
            t = torch.empty(shapes[key], dtype=torch.float32)
            t.normal_(0.0, std, generator=g) if t.dim() else t.fill_(1.0)
            writer.write(key, t.to(dtype))
            del t
    return Path(path).stat().st_size
