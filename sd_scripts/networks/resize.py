"""Resize a LoRA / LoCon / LoHa / LoKr / full network to a lower rank (kohya ``resize_lora`` style).

Each module's delta is decomposed in factor space (:func:`lora_math.factor_svd`): QR of its up
and down factors and an SVD of the small core, so no ``out x in*k*k`` matrix is formed unless
that is cheaper. The result is a kohya LoRA/LoCon file: the strength is kept by writing
``alpha' = (alpha / r) * r'`` for LoRA modules, ``alpha' = r'`` (scale 1) for modules converted
from another algorithm. Differences from kohya's ``resize_lora.py``, on purpose:

* dynamic methods keep the *smallest* rank that meets the target, never above the module's
  own rank (kohya keeps one more, and can add noise singular values beyond the original rank);
* ``new_conv_rank`` applies to k x k convolutions only; 1x1 convs use ``new_rank`` like training;
* Tucker (``lora_mid``), LoHa, LoKr and full modules are resized (to LoRA/LoCon form);
* ``ss_network_args`` and ``ss_network_alpha`` describe the output.

IA3 and norm modules have no rank and are copied unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lora_math as lm
from sd_scripts.networks.network_state import NetModule, lora_module_state, parse_network, unify_alpha

__all__ = ["ModuleResize", "ResizeResult", "check_resize_args", "resize_lora_file", "resize_network", "resized_metadata"]


@dataclass
class ModuleResize:
    """What happened to one module."""

    name: str
    algo: str
    old_rank: int
    new_rank: int
    alpha: float
    fro: float  # retained Frobenius fraction (sqrt of retained energy)
    sum: float  # retained share of the sum of singular values
    max_ratio: float  # S[0] / S[new_rank - 1]
    conv: bool


@dataclass
class ResizeResult:
    state_dict: dict[str, torch.Tensor]
    modules: list[ModuleResize]
    copied: list[str]  # modules passed through unchanged (IA3, norm)
    alpha: float | None = None  # the one alpha every LoRA module of the output has

    @property
    def mean_fro(self) -> float:
        vals = [m.fro for m in self.modules if not math.isnan(m.fro)]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def std_fro(self) -> float:
        vals = [m.fro for m in self.modules if not math.isnan(m.fro)]
        if len(vals) < 2:
            return 0.0
        mean = sum(vals) / len(vals)
        return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def check_resize_args(new_rank, new_conv_rank=None, method: str | None = None, param=None) -> str:
    """Validate the resize settings; returns the method (``"fixed"`` or a dynamic method)."""
    method = method or "fixed"
    if method not in ("fixed",) + lm.DYNAMIC_METHODS:
        raise ConfigError(f"dynamic_method: {method!r} is not a method; use sv_ratio, sv_fro or sv_cumulative",
                          setting="dynamic_method")
    for setting, value in (("new_rank", new_rank), ("new_conv_rank", new_conv_rank)):
        if value is None and setting == "new_conv_rank":
            continue
        if value is None or int(value) != value or int(value) < 1:
            raise ConfigError(f"{setting}: {value!r} is not a rank; give a whole number of 1 or more", setting=setting)
    if method == "fixed":
        if param is not None:
            raise ConfigError("dynamic_param: given without --dynamic_method; add --dynamic_method sv_ratio|sv_fro|sv_cumulative",
                              setting="dynamic_param")
        return method
    if param is None:
        raise ConfigError(f"dynamic_param: --dynamic_method {method} needs --dynamic_param", setting="dynamic_param")
    p = float(param)
    if method == "sv_ratio" and not (p >= 1.0 and math.isfinite(p)):
        raise ConfigError(f"dynamic_param: sv_ratio takes the largest/smallest kept singular value ratio, 1 or more (got {param})",
                          setting="dynamic_param")
    if method in ("sv_fro", "sv_cumulative") and not (0.0 < p <= 1.0):
        raise ConfigError(f"dynamic_param: {method} takes a fraction in (0, 1] (got {param})", setting="dynamic_param")
    return method


def _is_kxk(shape) -> bool:
    return any(k > 1 for k in lm.kernel_of(shape))


def resize_network(modules: Mapping[str, NetModule], new_rank: int, new_conv_rank: int | None = None,
                   method: str | None = None, param: float | None = None, device=None,
                   progress: Callable[[int, int], None] | None = None, source: str = "LoRA file") -> ResizeResult:
    """Resize every module; see the module docstring. ``progress(done, total)`` is called per module.

    Raises ConfigError when a fixed rank above every module's rank is asked for (that would only
    pad the file with zeros)."""
    method = check_resize_args(new_rank, new_conv_rank, method, param)
    conv_rank = int(new_conv_rank if new_conv_rank is not None else new_rank)
    new_rank = int(new_rank)
    if method == "fixed":
        plain = [m for m in modules.values() if m.algo == "lora" and "lora_mid.weight" not in m.parts]
        if len(plain) == len(modules):
            lin = [m.rank for m in plain if not _is_kxk(m.weight_shape())]
            conv = [m.rank for m in plain if _is_kxk(m.weight_shape())]
            too_big_lin = not lin or new_rank > max(lin)
            too_big_conv = not conv or conv_rank > max(conv)
            if too_big_lin and too_big_conv:
                now = f"rank {max(lin)}" if lin else ""
                if conv:
                    now += (", " if now else "") + f"conv rank {max(conv)}"
                asked = f"--new_rank {new_rank}" + (f" --new_conv_rank {conv_rank}" if conv and new_conv_rank else "")
                raise ConfigError(f"new_rank: {source} is {now}; {asked} is above it, and a resize cannot add detail "
                                  "(it would pad with zeros); choose a lower rank", setting="new_rank")
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleResize] = []
    copied: list[str] = []
    total = len(modules)
    for i, (name, mod) in enumerate(modules.items()):
        if not mod.has_low_rank_form:
            for part, tensor in mod.parts.items():
                out[f"{name}.{part}"] = tensor
            copied.append(name)
            if progress:
                progress(i + 1, total)
            continue
        dev = mod.to(device) if device is not None else mod
        shape = mod.weight_shape()
        conv = _is_kxk(shape)
        cap = min(conv_rank if conv else new_rank, mod.rank_bound())
        keep_scale = mod.algo == "lora"
        u, d = dev.updown(scaled=not keep_scale)
        res = lm.factor_svd(u, d)
        k = lm.select_rank(res.S, method, param, cap)
        up, down = lm.split_factors(res, k)
        scale = mod.scale if keep_scale else 1.0
        alpha = scale * k
        out.update({key: t.cpu() for key, t in lora_module_state(name, up, down, alpha, shape).items()})
        stats = lm.retained_stats(res, k)
        old_rank = mod.rank if mod.algo == "lora" else mod.rank_bound()
        reports.append(ModuleResize(name, mod.algo, old_rank, k, alpha, stats["fro"], stats["sum"],
                                    stats["max_ratio"], conv))
        if progress:
            progress(i + 1, total)
    alpha = unify_alpha(out)
    for report in reports:
        report.alpha = alpha
    return ResizeResult(out, reports, copied, alpha)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def resized_metadata(metadata: Mapping[str, str], result: ResizeResult, method: str, param, new_rank: int,
                     new_conv_rank: int | None) -> dict[str, str]:
    """The input's metadata with the network shape keys describing the resized file."""
    md = dict(metadata)
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        md.pop(key, None)
    lin = [m for m in result.modules if not m.conv]
    conv = [m for m in result.modules if m.conv]
    old_max = max((m.old_rank for m in result.modules), default=0)

    def common(values, fmt=_num):
        values = set(values)
        return fmt(values.pop()) if len(values) == 1 else "Dynamic"

    def as_float(value) -> str:
        return str(float(value))

    if method == "fixed":
        md["ss_network_dim"] = common(m.new_rank for m in lin) if lin else str(new_rank)
        comment = f"rank resized from {old_max} to {new_rank}"
        if conv and new_conv_rank is not None and new_conv_rank != new_rank:
            comment += f" (conv: {new_conv_rank})"
    else:
        md["ss_network_dim"] = "Dynamic"
        comment = f"dynamic resize with {method} {param} (max rank {new_rank}) from rank {old_max}"
    if result.alpha is not None:
        md["ss_network_alpha"] = as_float(result.alpha)
    if any(m.algo != "lora" for m in result.modules) and not result.copied:
        md["ss_network_module"] = "networks.lora"
    elif "ss_network_module" not in md:
        md["ss_network_module"] = "networks.lora"
    args: dict[str, str] = {}
    try:
        args = json.loads(md.get("ss_network_args", "") or "{}")
        if not isinstance(args, dict):
            args = {}
    except json.JSONDecodeError:
        args = {}
    if md["ss_network_module"] == "networks.lora":
        args = {k: v for k, v in args.items() if k not in ("algo", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp",
                                                          "factor", "decompose_both", "full_matrix")}
    if conv:
        args["conv_dim"] = common(m.new_rank for m in conv) if method == "fixed" else "Dynamic"
        args["conv_alpha"] = as_float(result.alpha)
    else:
        args.pop("conv_dim", None)
        args.pop("conv_alpha", None)
    if args:
        md["ss_network_args"] = json.dumps({k: str(v) for k, v in args.items()})
    else:
        md.pop("ss_network_args", None)
    old = md.get("ss_training_comment", "")
    md["ss_training_comment"] = comment + (f"; {old}" if old and old != "None" else "")
    return md


def _default_dtype(state_dict: Mapping[str, torch.Tensor]):
    for key, t in state_dict.items():
        if not key.endswith(".alpha") and t.is_floating_point():
            return t.dtype
    return torch.float32


def resize_lora_file(model, save_to, new_rank: int, new_conv_rank: int | None = None, method: str | None = None,
                     param: float | None = None, save_precision=None, device=None,
                     progress: Callable[[int, int], None] | None = None) -> ResizeResult:
    """Read ``model``, resize it and write ``save_to`` (safetensors with metadata, or .ckpt/.pt).

    ``save_precision`` None keeps the input's dtype. The output is written only when everything
    succeeded (atomically)."""
    from pathlib import Path

    from sd_scripts.files.lora_file import load_lora_file, precision_dtype, save_lora_file

    sd, md = load_lora_file(model, setting="model")
    modules = parse_network(sd, source=str(model), metadata=md)
    method = check_resize_args(new_rank, new_conv_rank, method, param)
    result = resize_network(modules, new_rank, new_conv_rank, method, param, device, progress, source=str(model))
    dtype = precision_dtype(save_precision) or _default_dtype(sd)
    ext = Path(save_to).suffix.lower().lstrip(".")
    fmt = ext if ext in ("ckpt", "pt") else "safetensors"
    save_lora_file(save_to, result.state_dict, resized_metadata(md, result, method, param, new_rank, new_conv_rank),
                   dtype, fmt)
    return result
