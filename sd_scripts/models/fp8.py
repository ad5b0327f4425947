"""``fp8_base`` for transformers: the frozen ``Linear`` weights stored in float8 (e4m3), computed in bf16/fp16.

The SDXL path stores the whole UNet in float8 and lets CUDA's autocast cast each weight as it is used. A FLUX-style
transformer has elementwise uses of its parameters (RMSNorm scales, modulation) that autocast does not cast, and
autocast saves the bf16 copy of every weight for the backward pass unless the block is checkpointed. Here only the
``Linear`` weights (over 99% of a FLUX transformer) go to float8; each layer casts its own weight to the compute
dtype when it runs and keeps only the float8 weight for the backward pass, on any device, with or without autocast.
Biases and every other parameter keep their dtype.

Call :func:`store_linear_weights_fp8` before LoRA modules are attached (LoRA keeps each layer's ``forward`` as it is
then), and do not cast the model with ``.to(dtype)`` afterwards (that would cast the float8 weights too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["FP8_DTYPE", "Fp8Linear", "compute_dtype_for", "store_linear_weights_fp8"]

FP8_DTYPE = torch.float8_e4m3fn


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _Fp8LinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` with ``W`` upcast on the fly; the backward upcasts ``W`` again instead of keeping a copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), weight.to(dtype), b)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen ``Linear`` whose weight is stored in float8 (made by :func:`store_linear_weights_fp8`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self.weight, self.bias, compute_dtype_for(x))


def store_linear_weights_fp8(module: torch.nn.Module,
                             keep: Callable[[str, torch.nn.Linear], bool] | None = None) -> int:
    """Store the weight of every ``nn.Linear`` in ``module`` (except where ``keep(name, layer)`` is true) in float8
    and make the layer an :class:`Fp8Linear`. Returns how many layers changed. The weights must be frozen."""
    count = 0
    for name, layer in module.named_modules():
        if type(layer) is not torch.nn.Linear or (keep is not None and keep(name, layer)):
            continue
        if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
            raise ValueError(f"{name}: float8 storage is for frozen weights; call requires_grad_(False) first")
        if "forward" in layer.__dict__:
            raise ValueError(f"{name}: a network is already attached to this layer; store the weights in float8 first")
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(FP8_DTYPE), requires_grad=False)
        layer.__class__ = Fp8Linear
        count += 1
    return count
