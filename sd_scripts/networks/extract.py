"""Extract a kohya LoRA/LoCon from two single-file SD1/SD2/SDXL checkpoints: ``tuned - base`` by SVD.

Modules are the layers kohya's LoRA (and with a conv parameter, LoCon) trains: attention and
feed-forward linears and 1x1 projections of the UNet's transformer blocks, the resnet convs,
time-embedding projections and shortcuts, the down/upsampler convs, and the text encoder's
attention and MLP linears (SD2 and SDXL's bigG: the q/k/v thirds of OpenCLIP's packed ``in_proj``). SDXL
files use kohya's SDXL names: SGM UNet paths (``lora_unet_input_blocks_4_1_...``), ``lora_te1_`` / ``lora_te2_``,
``ss_base_model_version`` ``sdxl_base_v1-0`` and the ``stable-diffusion-xl-v1-base/lora`` modelspec.

Rank per module, as LyCORIS' extract tool defines the modes (:func:`lora_math.select_rank`):
``fixed`` (linear/conv dims), ``threshold`` (singular values above an absolute value), ``ratio``
(above a fraction of the largest) and ``quantile`` (the values whose running sum is below a share
of the total). In ``fixed`` mode a rank far below the matrix size uses a randomized SVD
(``SVDResult.exact`` False; its relative error is reported per module).

Text-encoder modules are kept when ``max |delta| > min_diff`` (per module: kohya's all-or-nothing
gate dropped whole text encoders). The file is written with kohya keys, one alpha,
and kohya's minimum metadata (``ss_network_module``, dims, ``ss_v2``, ``ss_base_model_version``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lora_math as lm
from sd_scripts.networks.checkpoint_map import checkpoint_lora_map
from sd_scripts.networks.ldm_lora_map import lora_target_names
from sd_scripts.networks.network_state import lora_module_state, unify_alpha

__all__ = ["DEFAULT_MIN_DIFF", "ExtractResult", "ModuleExtract", "check_extract_args", "extract_lora_file",
           "extract_network", "extracted_metadata"]

DEFAULT_MIN_DIFF = 1e-3


@dataclass
class ModuleExtract:
    name: str
    rank: int
    rel_error: float  # ||delta - low rank||_F / ||delta||_F
    exact: bool  # False: randomized SVD
    conv: bool
    part: str  # "unet" or "te"


@dataclass
class ExtractResult:
    state_dict: dict[str, torch.Tensor]
    modules: list[ModuleExtract]
    skipped_te: list[str] = field(default_factory=list)  # text-encoder modules under min_diff
    unchanged: int = 0  # UNet modules identical in both checkpoints
    alpha: float | None = None


def check_extract_args(mode: str, linear_param, conv_param) -> None:
    """Validate mode and parameters (ConfigError naming the setting)."""
    if mode not in lm.EXTRACT_MODES:
        raise ConfigError(f"mode: {mode!r} is not an extraction mode; use fixed, threshold, ratio or quantile", setting="mode")
    for setting, value, optional in (("linear_param", linear_param, False), ("conv_param", conv_param, True)):
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{setting}: missing; give the {mode} value for the {setting.split('_')[0]} layers",
                              setting=setting)
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(f"{setting}: {value!r} is not a number", setting=setting)
        if mode == "fixed":
            low = 0 if optional else 1
            if v != int(v) or v < low:
                what = "0 (no conv layers) or more" if optional else "1 or more"
                raise ConfigError(f"{setting}: {value!r} is not a rank; give a whole number of {what}", setting=setting)
        elif mode == "threshold" and v < 0:
            raise ConfigError(f"{setting}: the threshold must be 0 or more (got {value})", setting=setting)
        elif mode == "ratio" and not 0 <= v <= 1:
            raise ConfigError(f"{setting}: ratio mode takes a fraction of the largest singular value, 0 to 1 (got {value})",
                              setting=setting)
        elif mode == "quantile" and not 0 < v <= 1:
            raise ConfigError(f"{setting}: quantile mode takes a share of the singular values' sum, above 0 and up to 1 "
                              f"(got {value})", setting=setting)


def _shapes_of(state: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key's shape; a lazily read state dict gives them from its header without reading the tensors."""
    if hasattr(state, "shapes"):
        return {k: tuple(v) for k, v in state.shapes().items()}
    return {k: tuple(v.shape) for k, v in state.items()}


def extract_network(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], mode: str = "fixed",
                    linear_param=4, conv_param=None, clamp_quantile: float | None = None,
                    min_diff: float = DEFAULT_MIN_DIFF, device=None, randomized: bool | str = "auto",
                    progress: Callable[[int, int], None] | None = None, base_name: str = "base",
                    tuned_name: str = "tuned") -> ExtractResult:
    """LoRA/LoCon state dict approximating ``tuned - base`` (see the module docstring)."""
    check_extract_args(mode, linear_param, conv_param)
    if clamp_quantile is not None and not 0 < float(clamp_quantile) <= 1:
        raise ConfigError(f"clamp_quantile: {clamp_quantile} must be above 0 and up to 1", setting="clamp_quantile")
    shapes = _shapes_of(base)
    tuned_shapes = _shapes_of(tuned)
    _, lora_map = checkpoint_lora_map(shapes)
    with_conv = conv_param is not None and not (mode == "fixed" and int(conv_param) == 0)
    names = lora_target_names(lora_map, conv=with_conv, shapes=shapes)
    if not names:
        raise ConfigError(f"base: {base_name} has no layers a LoRA can target; is it an SD1/SD2/SDXL or FLUX.1 "
                          "checkpoint?", setting="base")
    for name in names:
        key = lora_map[name].weight_key
        if key not in tuned_shapes:
            raise ConfigError(f"tuned: {tuned_name} has no {key}; the two checkpoints have different layouts "
                              "(SD1 vs SD2 vs SDXL vs FLUX.1?)", setting="tuned")
        if tuned_shapes[key] != shapes[key]:
            raise ConfigError(f"tuned: {key} is {tuned_shapes[key]} in {tuned_name} but {shapes[key]} in {base_name}; "
                              "the checkpoints have different shapes", setting="tuned")
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleExtract] = []
    skipped: list[str] = []
    unchanged = 0
    for i, name in enumerate(names):
        target = lora_map[name]
        rows = slice(*target.rows) if target.rows is not None else slice(None)
        dev = device if device is not None else "cpu"
        delta = tuned[target.weight_key][rows].to(dev, torch.float32) - base[target.weight_key][rows].to(dev, torch.float32)
        biggest = float(delta.abs().max()) if delta.numel() else 0.0
        if progress:
            progress(i + 1, len(names))
        if target.part == "te" and biggest <= min_diff:
            skipped.append(name)
            continue
        if biggest == 0.0:
            unchanged += 1
            continue
        shape = tuple(delta.shape)
        conv = any(k > 1 for k in lm.kernel_of(shape))
        param = conv_param if conv else linear_param
        w = delta.reshape(shape[0], -1)
        full_rank = min(w.shape)
        if mode == "fixed":
            res = lm.dense_svd(w, rank=min(int(param), full_rank), randomized=randomized)
            k = lm.select_rank(res.S, "fixed", None, min(int(param), full_rank))
        else:
            res = lm.dense_svd(w, randomized=False)
            k = lm.select_rank(res.S, mode, float(param), full_rank)
        if clamp_quantile is not None and float(clamp_quantile) < 1:
            up, down = lm.clamped_factors(res, k, float(clamp_quantile))
            residual = float((w - up @ down).double().pow(2).sum())
            rel = math.sqrt(residual / res.total_sq) if res.total_sq > 0 else 0.0
        else:
            up, down = lm.split_factors(res, k)
            rel = lm.retained_stats(res, k)["rel_error"]
        out.update({key: t.cpu() for key, t in lora_module_state(name, up, down, float(k), shape).items()})
        reports.append(ModuleExtract(name, k, rel, res.exact, conv, target.part))
    if not out:
        raise ConfigError(f"tuned: {tuned_name} does not differ from {base_name} on any LoRA layer "
                          f"(text-encoder differences at most min_diff {min_diff}); nothing to extract", setting="tuned")
    alpha = unify_alpha(out)
    return ExtractResult(out, reports, skipped, unchanged, alpha)


def extracted_metadata(result: ExtractResult, family: str, mode: str, linear_param, conv_param, base_path,
                       tuned_path, title: str | None = None, variant: str = "dev") -> dict[str, str]:
    from pathlib import Path

    from sd_scripts.files.lora_file import build_modelspec

    v2 = family == "sd2"
    sdxl = family == "sdxl"
    fixed = mode == "fixed"
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(linear_param)) if fixed else "Dynamic",
        "ss_network_alpha": str(float(result.alpha)) if result.alpha is not None else "Dynamic",
        "ss_v2": str(v2),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v2" if v2 else "sd_v1",
        "ss_sd_model_name": Path(base_path).name,
        "ss_training_comment": f"extracted ({mode}: linear {linear_param}, conv {conv_param}) "
                               f"from {Path(tuned_path).name} - {Path(base_path).name}",
    }
    if any(m.conv for m in result.modules):
        md["ss_network_args"] = json.dumps({"conv_dim": str(int(conv_param)) if fixed else "Dynamic",
                                            "conv_alpha": md["ss_network_alpha"]})
    if family == "flux":
        from types import SimpleNamespace

        from sd_scripts.models.families import get_family

        flux = get_family("flux")
        md.pop("ss_v2")
        md["ss_base_model_version"] = flux.base_model_version(False)
        described = SimpleNamespace(info={"flux_variant": variant})  # what modelspec_architecture reads of a model
        md.update(build_modelspec(flux.modelspec_architecture(False, described), title, 1024,
                                  implementation=flux.modelspec_implementation,
                                  prediction_type=flux.modelspec_prediction_type(False)))
    elif sdxl:
        md.update(build_modelspec("stable-diffusion-xl-v1-base", title, 1024))
    else:
        md.update(build_modelspec("stable-diffusion-v2-512" if v2 else "stable-diffusion-v1", title, 512))
    return md


def extract_lora_file(base, tuned, save_to, mode: str = "fixed", linear_param=4, conv_param=None,
                      clamp_quantile: float | None = None, min_diff: float = DEFAULT_MIN_DIFF, v2: bool | None = None,
                      save_precision=None, device=None, overwrite: bool = False, randomized: bool | str = "auto",
                      progress=None, checkpoints=None) -> ExtractResult:
    """Read both checkpoints, extract and write ``save_to`` atomically. ``checkpoints`` may pass
    already-read ``(base_state, tuned_state, family)`` (queues reuse them)."""
    from pathlib import Path

    from sd_scripts.files.lora_file import precision_dtype, save_lora_file
    from sd_scripts.networks.tool_io import check_output_path, lora_format_of, read_checkpoint_pair

    check_extract_args(mode, linear_param, conv_param)
    out = check_output_path(save_to, "save_to", overwrite)
    dtype = precision_dtype(save_precision)
    if checkpoints is None:
        base_sd, tuned_sd, family = read_checkpoint_pair(base, tuned)
    else:
        base_sd, tuned_sd, family = checkpoints
    if v2 and family != "sd2":
        what = {"sdxl": "an SDXL", "flux": "a FLUX.1"}.get(family, "an SD1")
        raise ConfigError(f"is_v2: --is_v2 was given but {base} is {what} checkpoint; drop --is_v2", setting="is_v2")
    result = extract_network(base_sd, tuned_sd, mode, linear_param, conv_param, clamp_quantile, min_diff, device,
                             randomized, progress, str(base), str(tuned))
    variant = "dev" if any(k.endswith("guidance_in.in_layer.weight") for k in base_sd) else "schnell"
    md = extracted_metadata(result, family, mode, linear_param, conv_param, base, tuned, Path(out).stem, variant)
    save_lora_file(out, result.state_dict, md, dtype, lora_format_of(out))
    return result
