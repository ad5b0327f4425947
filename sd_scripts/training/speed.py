"""What the machine computes fast, and the memory each phase of a run held.

* :func:`cpu_bf16_support`: "native" where the CPU has bf16 instructions (AMX-BF16 or AVX512-BF16 on x86, the BF16
  extension on ARM), else "emulated" (bf16 then runs through float32 conversions: slower than float32).
* :func:`frozen_weight_dtype`: the dtype of the frozen UNet and text encoders while training: the mixed precision on
  CUDA, and on a CPU with native bf16 under ``mixed_precision bf16``; float32 otherwise.
* :func:`optimizer_speed_kwargs`: torch's fused (or else multi-tensor) step for the optimizers that have one.
* :class:`PhaseMemory`: the process's peak RSS (CPU) or CUDA peak at the end of each phase (load, cache, train).
* :func:`apply_speed_options`: ``channels_last`` and ``torch_compile`` (``models/compile.py``), and on a CPU
  ``cpu_conv_paths`` (``models/conv_paths.py``), on the denoiser;
  :class:`CompileClock` reports the compile time apart from the steady steps.
* :func:`release_vae`: the VAE leaves memory once every latent is cached (kept when samples need it).
* :func:`cache_accelerate_package_checks` and :func:`clip_gradients`: the loop's own costs found by profiling a
  step (``bench/profile_step.py``): accelerate's per-step package lookups and DTensor scan.
"""

from __future__ import annotations

import inspect
import os
import resource
import sys
from typing import Any

from sd_scripts.core.config import TrainConfig

__all__ = ["cpu_bf16_support", "frozen_weight_dtype", "bf16_cpu_note", "optimizer_speed_kwargs", "PhaseMemory",
           "peak_rss_mb", "apply_speed_options", "release_vae", "CompileClock", "cache_accelerate_package_checks",
           "clip_gradients", "clip_coefficient"]

_X86_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_bf16_support(cpuinfo: str | None = None, ask_torch: bool = True) -> str:
    """``"native"`` or ``"emulated"``. Reads ``/proc/cpuinfo`` where there is one (or ``cpuinfo`` given);
    elsewhere asks oneDNN (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), or says ``"unknown"`` when
    ``ask_torch`` is off (a caller that must not import torch)."""
    if cpuinfo is None and os.path.isfile("/proc/cpuinfo"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = None
    if cpuinfo is not None:
        flags = _cpu_flags(cpuinfo)
        return "native" if flags & _X86_BF16_FLAGS or "bf16" in flags else "emulated"
    if not ask_torch:
        return "unknown"
    try:
        import torch

        return "native" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    except Exception:  # noqa: BLE001 - an old torch without the query: assume the slow path
        return "emulated"


def frozen_weight_dtype(mixed_precision: str | None, device_type: str, bf16_support: str | None = None):
    """The frozen base weights' dtype: the mixed precision on CUDA; bf16 on a CPU that computes it natively;
    float32 elsewhere (a CPU has no fp16 matmuls, and emulated bf16 weights only cost conversions)."""
    import torch

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no")
    if half is None:
        return torch.float32
    if device_type == "cuda":
        return half
    if device_type == "cpu" and half is torch.bfloat16:
        return half if (bf16_support or cpu_bf16_support()) == "native" else torch.float32
    return torch.float32


def bf16_cpu_note(mixed_precision: str | None, device_type: str, bf16_support: str | None = None) -> str | None:
    """The line reported at the start of a bf16 run on a CPU, or None."""
    if (mixed_precision or "no") != "bf16" or device_type != "cpu":
        return None
    if (bf16_support or cpu_bf16_support()) == "native":
        return "bf16 on CPU: native (frozen weights in bf16, computed under bf16 autocast; the network trains in float32)"
    return ("bf16 on CPU: emulated, slower (this CPU has no AMX/AVX512-BF16: float32 weights under bf16 autocast; "
            "mixed_precision no is faster here)")


def optimizer_speed_kwargs(optimizer_class: Any, params_device_type: str, user_kwargs: dict) -> dict:
    """``fused=True`` where torch's optimizer has a fused step for the device (GPUs and, since torch 2.4, CPUs),
    else ``foreach=True`` where it has a multi-tensor one; nothing for other optimizers or when the user set either.
    Same update up to float rounding, far fewer kernel calls. On a CPU the multi-tensor step is a loop of per-tensor
    ops, while the fused one updates each tensor in one vectorized pass: AdamW over a full-size SD1.5 UNet's LoRA
    (dim 16, 384 tensors) took 12.7 CPU ms per step fused against 47.6 ms foreach and 52.4 ms single-tensor, over a
    tiny UNet's 96 tensors 1.3 ms against 4.5 and 8.0 (``bench/speed_options.py --optimizer_step``)."""
    if "fused" in user_kwargs or "foreach" in user_kwargs:
        return {}
    module = getattr(optimizer_class, "__module__", "") or ""
    if not module.startswith("torch.optim"):
        return {}
    try:
        names = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):
        return {}
    if "fused" in names and _has_fused(optimizer_class, params_device_type):
        return {"fused": True}
    if "foreach" in names:
        return {"foreach": True}
    return {}


def _has_fused(optimizer_class: Any, device_type: str) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older torch
        return device_type == "cuda"


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PhaseMemory:
    """Peak memory at the end of each phase: ``mark("load")`` ... ``summary()`` -> "load 4.1 GB, cache 4.3 GB".
    On a CPU the process's peak RSS (it only grows, so each figure is the peak up to that phase's end); with CUDA
    the allocator's peak within the phase."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> float:
        if self.device_type == "cuda":
            import torch

            value = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            value = peak_rss_mb()
        self.marks.append((phase, value))
        return value

    def summary(self) -> str:
        what = "peak VRAM" if self.device_type == "cuda" else "peak RSS"
        return f"{what}: " + ", ".join(f"{phase} {value / 1024:.2f} GB" for phase, value in self.marks)


def apply_speed_options(config: TrainConfig, unet: Any) -> list[str]:
    """``channels_last``, ``torch_compile`` and ``cpu_conv_paths`` on the frozen denoiser (after the network is
    injected and the model reached its device, dtype and training mode); returns the lines to report."""
    from sd_scripts.models.compile import compile_repeated_blocks, use_channels_last
    from sd_scripts.models.conv_paths import use_cpu_conv_paths

    lines = []
    on_cpu = next(unet.parameters()).device.type == "cpu"
    if config.cpu_conv_paths and on_cpu and not config.channels_last:
        # the frozen float32 convolutions (compiled blocks call the same kernels); silent: it changes no result
        # beyond rounding
        use_cpu_conv_paths(unet)
    if config.channels_last:
        count = use_channels_last(unet)
        lines.append(f"channels_last: {count} convolutions of the UNet in channels_last layout")
    if config.torch_compile:
        backend = config.dynamo_backend or "inductor"
        count = compile_repeated_blocks(unet, backend)
        lines.append(f"torch_compile: {count} repeated blocks compiled with {backend} (regional); the first steps "
                     "include the compile time")
    return lines


def release_vae(model: Any, owned: bool) -> None:
    """Every latent is cached and no sample image will be drawn: the VAE leaves memory (on a GPU it also leaves the
    device). A model the caller passed in keeps its VAE on the CPU instead, since the caller may use it again."""
    vae = getattr(model, "vae", None)
    if vae is None:
        return
    vae.to("cpu")
    if owned:
        model.vae = None


class CompileClock:
    """Wraps the callbacks while ``torch_compile`` is on: after the third optimizer step it reports how long the
    first steps took beyond steady ones (the compile time), apart from the steady step time."""

    def __init__(self, callbacks: Any, start: float):
        import time

        self._cb = callbacks
        self._times = [start]
        self._clock = time.perf_counter

    def __getattr__(self, name: str):
        return getattr(self._cb, name)

    def on_progress(self, step, total, loss, lr, epoch) -> None:
        if self._times is not None:
            self._times.append(self._clock())
            if len(self._times) == 4:
                gaps = [b - a for a, b in zip(self._times, self._times[1:])]
                steady = gaps[-1]
                compile_s = max(0.0, gaps[0] + gaps[1] - 2 * steady)
                self._cb.on_message(f"torch_compile: about {compile_s:.1f} s compiling in the first steps; "
                                    f"steady step {steady:.3f} s")
                self._times = None
        self._cb.on_progress(step, total, loss, lr, epoch)


def cache_accelerate_package_checks() -> None:
    """accelerate asks importlib whether the ``lomo_optim`` package is installed on every optimizer step and every
    gradient clip (sys.path searches: about 4 ms each on a CPU here, three per step). The answer cannot change
    during a run, so it is asked once."""
    import functools

    import accelerate.accelerator
    import accelerate.optimizer

    for module in (accelerate.accelerator, accelerate.optimizer):
        check = getattr(module, "is_lomo_available", None)
        if check is not None and not hasattr(check, "cache_info"):
            module.is_lomo_available = functools.cache(check)


def clip_gradients(accelerator: Any, params: list, max_norm: float):
    """The gradients' total norm, clipped to ``max_norm``: torch's ``clip_grad_norm_`` after the loss scaler's
    unscale, as accelerate does for one process or DDP, without its per-call package checks and DTensor scan;
    accelerate's own for FSDP, DeepSpeed and XLA."""
    import torch
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        accelerator.unscale_gradients()
        grads = [p.grad for p in params if p.grad is not None]
        if grads and len({(g.device, g.dtype, g.layout) for g in grads}) == 1 and grads[0].layout == torch.strided:
            return _clip_same_kind(grads, max_norm)
        # multi-tensor norm and scale: one kernel over all the gradients instead of two per tensor
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=accelerator.device.type in ("cpu", "cuda"))
    return accelerator.clip_grad_norm_(params, max_norm)


def _clip_same_kind(grads: list, max_norm: float):
    """``clip_grad_norm_``'s own operations for gradients of one device and dtype (the usual case), without its
    grouping by device and dtype, which took more time than the arithmetic: 0.5 ms against 1.1-1.2 ms per step for a
    tiny UNet's 96 LoRA tensors on a CPU. The values are the same bit for bit."""
    import torch

    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, clip_coefficient(total, max_norm))
    return total


def clip_coefficient(total_norm, max_norm: float):
    """What gradients of total norm ``total_norm`` are multiplied by to clip them to ``max_norm``
    (``clip_grad_norm_``'s formula): at most 1."""
    import torch

    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
