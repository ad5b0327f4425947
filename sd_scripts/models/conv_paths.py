"""Convolution paths on CPU chosen per shape (``cpu_conv_paths``): the frozen UNet's float32 convolutions run the
kernel measured fastest for their shape instead of the one PyTorch picks.

PyTorch's CPU convolution takes oneDNN in NCHW when the batch is over 1 or the input has over 20480 elements, and
its im2col + GEMM path (``thnn_conv2d``) otherwise. Measured on a full-size SD1.5 UNet (float32, one thread,
forward + input gradient, ``bench/conv_paths.py``), that pick is far from the fastest for the deep, wide levels:

* at batch 1, weights of 10M elements or more (1280 channels and up, 3x3) at up to 16x16 outputs: oneDNN NCHW
  takes 2-4x the im2col path's time (2560->1280 at 4x4: 308 ms against 72 ms). At batch 4 oneDNN is as fast or
  faster (the im2col path runs sample by sample), so larger batches keep PyTorch's pick;
* 1x1 convolutions with outputs of 2x2 or fewer (the 128 px UNet's deepest level): the im2col path takes 3-4x
  oneDNN's time in channels_last (2560->1280, batch 1: 20 ms against 6 ms). 3x3 ones would gain too, but only with
  their weights kept in channels_last, and reordering a 60 MB weight at each call costs more than it saves. Narrow
  1x1 weights (64->64, 128->64: test-sized models) are 1.1x slower in channels_last at batch 1, forward + input
  gradient at 2x2; from 320->320, the narrowest 1x1 convolution of SD1.x/SD2.x/SDXL, 2-6x faster. So only 1x1
  weights of 256x256 elements or more take it.

A whole UNet forward + backward at batch 1 takes 0.78x the CPU time at 128 px and 0.73x at 256 px (0.98x at batch 4).
The choice is a fixed rule of the shapes, so a run is repeatable and resumes exactly; the values differ from
PyTorch's own pick only by float rounding. It applies to frozen float32 convolutions on CPU outside autocast;
anything else (trained convolutions such as LoCon's, GPUs, bf16, dilated or grouped convolutions) runs as before.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

__all__ = ["conv_path", "may_leave_torch", "use_cpu_conv_paths", "remove_cpu_conv_paths"]

BIG_WEIGHT = 10_000_000  # weight elements from which im2col beats oneDNN NCHW at small outputs
SMALL_OUTPUT = 16 * 16  # output positions up to which it does (measured up to 16x16)
TINY_OUTPUT = 2 * 2  # output positions up to which oneDNN channels_last beats both
WIDE_POINTWISE = 256 * 256  # 1x1 weight elements from which it does


def conv_path(batch: int, weight_shape: tuple[int, ...], output_positions: int) -> str:
    """The path for one convolution call: ``"channels_last"`` (oneDNN NHWC), ``"im2col"`` (``thnn_conv2d``) or
    ``"torch"`` (PyTorch's own pick)."""
    if output_positions <= TINY_OUTPUT and _pointwise(weight_shape):
        return "channels_last"
    if batch == 1 and _big(weight_shape) and output_positions <= SMALL_OUTPUT:
        return "im2col"
    return "torch"


def may_leave_torch(weight_shape: tuple[int, ...]) -> bool:
    """Whether :func:`conv_path` can give anything but ``"torch"`` for this weight at some input: a wide 1x1
    weight or a big one. The others are left unpatched, so the small convolutions pay no per-call check (a tiny
    UNet's step is all such calls)."""
    return _pointwise(weight_shape) or _big(weight_shape)


def _pointwise(weight_shape: tuple[int, ...]) -> bool:
    out_channels, in_channels, kernel_h, kernel_w = weight_shape
    return kernel_h * kernel_w == 1 and out_channels * in_channels >= WIDE_POINTWISE


def _big(weight_shape: tuple[int, ...]) -> bool:
    out_channels, in_channels, kernel_h, kernel_w = weight_shape
    return out_channels * in_channels * kernel_h * kernel_w >= BIG_WEIGHT


def use_cpu_conv_paths(model: Any) -> int:
    """Give every plain frozen ``Conv2d`` of ``model`` that may leave PyTorch's pick the per-shape path; returns
    how many. Undo with :func:`remove_cpu_conv_paths`."""
    import torch

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and _plain(module) and may_leave_torch(tuple(module.weight.shape)):
            module._conv_forward = MethodType(_conv_forward_by_shape, module)
            module._conv_paths = {}  # input shape -> path, decided once per shape
            count += 1
    return count


def remove_cpu_conv_paths(model: Any) -> None:
    for module in model.modules():
        module.__dict__.pop("_conv_forward", None)
        module.__dict__.pop("_conv_paths", None)


def _plain(conv) -> bool:
    """An ungrouped, undilated, zero-padded convolution whose weight is a frozen tensor (LyCORIS' full network
    replaces the weight by its own)."""
    import torch

    weight = getattr(conv, "weight", None)
    return (isinstance(weight, torch.Tensor) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros" and not weight.requires_grad)


def _conv_forward_by_shape(self, input, weight, bias):
    import torch
    import torch.nn.functional as F

    if (input.device.type != "cpu" or input.dim() != 4 or input.dtype != torch.float32 or weight.dtype != torch.float32
            or weight.requires_grad or torch.is_autocast_enabled("cpu")):
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
    path = self._conv_paths.get(input.shape)
    if path is None:
        out_h = (input.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out_w = (input.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        path = self._conv_paths[input.shape] = conv_path(input.shape[0], tuple(weight.shape), out_h * out_w)
    if path == "im2col":
        return torch._C._nn.thnn_conv2d(input, weight, self.kernel_size, bias, self.stride, self.padding)
    if path == "channels_last":  # 1x1 weights are channels_last already: only the (small) input is reordered
        layout = torch.channels_last
        out = F.conv2d(input.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias,
                       self.stride, self.padding)
        return out.contiguous()
    return F.conv2d(input, weight, bias, self.stride, self.padding)
