"""Merge LoRA networks together (by SVD to a new rank, or exactly by concatenation) or into a checkpoint.

Both LoRA-to-LoRA modes start from each module's low-rank form ``ratio * (alpha/r) * U @ D``
(LoRA, Tucker LoCon, LoHa, LoKr and full modules all have one, see :mod:`lora_math`):

* ``--concat``: the forms are stacked along the rank axis with ``sqrt(|ratio * scale|)`` on each
  side (the sign on the up side) and ``alpha = rank`` (scale 1), so the output delta is **exactly**
  ``sum ratio_i * delta_i``, for any ranks and any real ratios. (kohya's concat keeps the first
  file's alpha, which halves two equal LoRAs; its non-concat merge sums ups and downs separately and so
  acts as ``ratio * |ratio|``. ``tests/test_lora_merge.py`` checks the exact sums.)
* SVD: the stacked form is decomposed in factor space and truncated to ``new_rank`` /
  ``new_conv_rank`` (k x k convs), ``alpha = rank``. No quantile clamp (kohya's svd_merge clamps the
  factors' values at a quantile, which changes the merged delta beyond the truncation).

Merging into a checkpoint is :mod:`sd_scripts.networks.lycoris_merge`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.files.user_metadata import merged_user_modelspec
from sd_scripts.networks import lora_math as lm
from sd_scripts.networks.network_state import NetModule, lora_module_state, unify_alpha

__all__ = ["ModuleMerge", "merge_lora_files", "merge_networks_concat", "merge_networks_svd", "merged_metadata"]


@dataclass
class ModuleMerge:
    name: str
    sources: int  # how many networks have this module
    rank: int
    fro: float  # retained Frobenius fraction of the summed delta (1.0 for concat)
    conv: bool


def _is_kxk(shape) -> bool:
    return any(k > 1 for k in lm.kernel_of(shape))


def _collect(networks: Sequence[tuple[str, Mapping[str, NetModule], float]]):
    """``{name: [(label, module, ratio)]}`` over the union of modules, in first-seen order, with checks."""
    by_name: dict[str, list[tuple[str, NetModule, float]]] = {}
    for label, modules, ratio in networks:
        for name, mod in modules.items():
            if not mod.has_low_rank_form:
                raise ConfigError(f"{label}: module {name} is {mod.algo.upper()}, which changes the base weights "
                                  "multiplicatively; merge it into a checkpoint with --sd_model instead")
            by_name.setdefault(name, []).append((label, mod, float(ratio)))
    for name, items in by_name.items():
        first_label, first, _ = items[0]
        shape = first.weight_shape()
        for label, mod, _ in items[1:]:
            other = mod.weight_shape()
            flat = (shape[0], math.prod(shape[1:]))
            if (other[0], math.prod(other[1:])) != flat:
                raise ConfigError(f"{label}: module {name} is shaped {tuple(other)} but {tuple(shape)} in {first_label}; "
                                  "the LoRAs are for different base models")
    return by_name


def _stacked(items, device, signed_sqrt: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    ups, downs = [], []
    for _, mod, ratio in items:
        if ratio == 0.0:
            continue
        m = mod.to(device) if device is not None else mod
        u, d = m.updown(scaled=False)
        c = ratio * m.scale
        if signed_sqrt:
            root = math.sqrt(abs(c))
            ups.append(u * (math.copysign(root, c)))
            downs.append(d * root)
        else:
            ups.append(u * c)
            downs.append(d)
    if not ups:
        return None
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def merge_networks_concat(networks: Sequence[tuple[str, Mapping[str, NetModule], float]], device=None):
    """Exact merge: output rank per module = sum of the inputs' low-rank form ranks. Returns ``(state_dict, reports)``."""
    out: dict[str, torch.Tensor] = {}
    reports = []
    for name, items in _collect(networks).items():
        shape = items[0][1].weight_shape()
        stacked = _stacked(items, device, signed_sqrt=True)
        if stacked is None:
            continue
        up, down = stacked
        r = int(down.shape[0])
        out.update({k: v.cpu() for k, v in lora_module_state(name, up, down, float(r), shape).items()})
        reports.append(ModuleMerge(name, len(items), r, 1.0, _is_kxk(shape)))
    unify_alpha(out)
    return out, reports


def merge_networks_svd(networks: Sequence[tuple[str, Mapping[str, NetModule], float]], new_rank: int,
                       new_conv_rank: int | None = None, device=None,
                       progress: Callable[[int, int], None] | None = None):
    """Sum of ``ratio * delta`` per module, truncated to ``new_rank`` (``new_conv_rank`` for k x k convs) by a
    factor-space SVD; ``alpha = rank``. Returns ``(state_dict, reports)``."""
    for setting, value in (("new_rank", new_rank), ("new_conv_rank", new_conv_rank)):
        if value is None and setting == "new_conv_rank":
            continue
        if value is None or int(value) != value or int(value) < 1:
            raise ConfigError(f"{setting}: {value!r} is not a rank; give a whole number of 1 or more", setting=setting)
    conv_rank = int(new_conv_rank if new_conv_rank is not None else new_rank)
    out: dict[str, torch.Tensor] = {}
    reports = []
    groups = _collect(networks)
    for i, (name, items) in enumerate(groups.items()):
        shape = items[0][1].weight_shape()
        stacked = _stacked(items, device, signed_sqrt=False)
        if stacked is not None:
            u, d = stacked
            res = lm.factor_svd(u, d)
            conv = _is_kxk(shape)
            k = lm.select_rank(res.S, "fixed", None, min(conv_rank if conv else int(new_rank), int(res.S.shape[0])))
            up, down = lm.split_factors(res, k)
            out.update({key: v.cpu() for key, v in lora_module_state(name, up, down, float(k), shape).items()})
            reports.append(ModuleMerge(name, len(items), k, lm.retained_stats(res, k)["fro"], conv))
        if progress:
            progress(i + 1, len(groups))
    unify_alpha(out)
    return out, reports


def merged_metadata(metadatas: Sequence[Mapping[str, str]], labels: Sequence[str], ratios: Sequence[float],
                    reports: Sequence[ModuleMerge], mode: str, alpha: float | None = None) -> dict[str, str]:
    """kohya's minimum LoRA metadata for a merge; the base model keys come from the first file that has them,
    the user's keys (trigger phrases, tags, author, ...) from :func:`merged_user_modelspec`."""
    md: dict[str, str] = {}
    for key in ("ss_v2", "ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                "modelspec.resolution", "modelspec.prediction_type", "modelspec.sai_model_spec"):
        for source in metadatas:
            if key in source:
                md[key] = source[key]
                break
    lin = {r.rank for r in reports if not r.conv}
    conv = {r.rank for r in reports if r.conv}
    md["ss_network_module"] = "networks.lora"
    md["ss_network_dim"] = str(lin.pop()) if len(lin) == 1 else "Dynamic"
    md["ss_network_alpha"] = str(float(alpha)) if alpha is not None else "Dynamic"
    if conv:
        dim = str(conv.pop()) if len(conv) == 1 else "Dynamic"
        md["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": md["ss_network_alpha"]})
    parts = [f"{label} x {ratio:g}" for label, ratio in zip(labels, ratios)]
    md["ss_training_comment"] = f"merged ({mode}): " + ", ".join(parts)
    md["modelspec.merged_from"] = ", ".join(str(label) for label in labels)
    md.update(merged_user_modelspec(metadatas))
    return md


def merge_lora_files(models: Sequence, ratios: Sequence[float], save_to, new_rank: int | None = None,
                     new_conv_rank: int | None = None, concat: bool = False, save_precision=None, device=None,
                     overwrite: bool = False, progress=None):
    """LoRA files -> one LoRA file (SVD to ``new_rank`` or exact ``concat``). Returns the module reports."""
    from pathlib import Path

    from sd_scripts.files.lora_file import precision_dtype, save_lora_file
    from sd_scripts.networks.tool_io import check_output_path, load_network, lora_format_of

    if not models:
        raise ConfigError("models: no LoRA given; add --models A.safetensors B.safetensors", setting="models")
    if len(models) != len(ratios):
        raise ConfigError(f"ratios: {len(ratios)} ratios for {len(models)} models; give one ratio per model", setting="ratios")
    if any(not math.isfinite(float(r)) for r in ratios):
        raise ConfigError("ratios: every ratio must be a finite number", setting="ratios")
    if concat and (new_rank is not None or new_conv_rank is not None):
        raise ConfigError("concat: --concat keeps every rank (rank = sum of ranks); drop --new_rank or --concat",
                          setting="concat")
    if not concat and new_rank is None:
        raise ConfigError("new_rank: merging LoRAs together needs --new_rank N (SVD) or --concat (exact)",
                          setting="new_rank")
    if new_rank is not None and (int(new_rank) != new_rank or new_rank < 1):
        raise ConfigError(f"new_rank: {new_rank!r} is not a rank; give a whole number of 1 or more", setting="new_rank")
    out = check_output_path(save_to, "save_to", overwrite)
    dtype = precision_dtype(save_precision)
    networks, metadatas, dtypes = [], [], []
    for path in models:
        modules, md = load_network(path, "models")
        networks.append((str(path), modules, 0.0))
        metadatas.append(md)
        dtypes.extend(t.dtype for m in modules.values() for k, t in m.parts.items() if k != "alpha" and t.is_floating_point())
    networks = [(label, modules, float(r)) for (label, modules, _), r in zip(networks, ratios)]
    if concat:
        sd, reports = merge_networks_concat(networks, device)
    else:
        sd, reports = merge_networks_svd(networks, new_rank, new_conv_rank, device, progress)
    if dtype is None:
        dtype = dtypes[0] if dtypes and all(d == dtypes[0] for d in dtypes) else torch.float32
    labels = [Path(p).name for p in models]
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    md = merged_metadata(metadatas, labels, [float(r) for r in ratios], reports, "concat" if concat else f"svd rank {new_rank}",
                         alphas.pop() if len(alphas) == 1 else None)
    md["modelspec.title"] = Path(out).stem  # a new model: named after its file, as kohya's merge tools do
    save_lora_file(out, sd, md, dtype, lora_format_of(out))
    return reports
