"""Merge LoRA / LoCon / LoHa / LoKr (with or without DoRA) / IA3 / GLoRA / full / norm / OFT / BOFT networks
into a single-file SD1/SD2/SDXL checkpoint.

The module -> weight map is :mod:`sd_scripts.networks.ldm_lora_map` (family detected from the checkpoint's
keys; SDXL networks use kohya's SGM UNet names and ``lora_te1_`` / ``lora_te2_``).

``W' = W + sum_i ratio_i * delta_i`` per weight, computed in float32 and cast back to the
weight's own dtype once, whatever the number of networks. The deltas (LyCORIS 4.1.3's formulas):

* LoRA/LoCon: ``(alpha/r) up @ down``, Tucker ``lora_mid`` included;
* LoHa: ``(alpha/r) (w1a w1b) ⊙ (w2a w2b)`` and LoKr ``(alpha/r) kron(w1, w2)``, each scaled
  **once** (LyCORIS 3.0-4.1.3's own merge squares alpha/r);
* IA3: ``W_base ⊙ w`` along the output rows or input columns (``on_input``);
* full: ``diff`` (and ``diff_b`` on the bias); norm: ``w_norm`` / ``b_norm``;
* GLoRA: ``(alpha/r) (W a1 a2 + b1 b2)`` with the base ``W``.

DoRA (``dora_scale``), OFT and BOFT are no deltas: the module's merged weight is computed from the weight
as merged so far (networks in the order given), as LyCORIS' ``get_merged_weight(ratio)``
(:meth:`NetModule.merged_weight`): DoRA rescales ``W + delta`` per output row (or input column) to
``m (dora_scale / ||W + delta|| - 1) + 1``, OFT/BOFT rotate the rows of ``W``.

Every other checkpoint key and every dtype is kept (float8 tensors become bf16 unless an output dtype is chosen:
a small delta added to a float8 weight would mostly round away). A module that matches no checkpoint weight is
reported; a network of which no module matches, or a module whose shape differs from its weight,
is a user error.

A .safetensors checkpoint merged into a .safetensors file is streamed (:func:`stream_merge_file`): one tensor is read,
changed and written at a time, so the memory peak does not grow with the model (a 12B FLUX.1 transformer is 24 GB in
bf16). Other formats are read whole (:func:`merge_into_checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks import lora_math as lm
from sd_scripts.networks.checkpoint_map import checkpoint_lora_map
from sd_scripts.networks.ldm_lora_map import LdmTarget
from sd_scripts.files.lora_keys import lora_name_spellings
from sd_scripts.networks.network_state import NetModule

__all__ = ["CheckpointMergeReport", "NetworkInput", "merge_into_checkpoint", "merge_lycoris_file"]


@dataclass
class NetworkInput:
    """One network to merge: a label for messages (its path), its modules, and its ratio."""

    label: str
    modules: Mapping[str, NetModule]
    ratio: float


@dataclass
class CheckpointMergeReport:
    merged: dict[str, int] = field(default_factory=dict)  # label -> modules merged
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # label -> module names not in the checkpoint
    weights_changed: int = 0


_OTHER_FAMILIES = {"sdxl": "SD1/SD2", "flux": "SD1/SD2/SDXL", "sd1": "SDXL or FLUX.1", "sd2": "SDXL or FLUX.1"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _find(lora_map: Mapping[str, LdmTarget], name: str) -> LdmTarget | None:
    for spelling in lora_name_spellings(name):
        if spelling in lora_map:
            return lora_map[spelling]
    return None


def _check_shape(label: str, mod: NetModule, region_shape, ckpt_name: str, family: str | None = None) -> None:
    if mod.algo == "ia3":
        w = mod.parts["weight"]
        on_input = bool(int(mod.parts["on_input"].reshape(-1)[0])) if "on_input" in mod.parts else False
        want = int(region_shape[1] if on_input else region_shape[0])
        if w.numel() != want:
            raise ConfigError(f"{label}: IA3 module {mod.name} has {w.numel()} channels but the {ckpt_name} weight has "
                              f"{want}; is the network for another model version?")
        return
    if mod.algo in ("oft", "boft"):
        rescale = mod.parts.get("rescale")
        if mod.out_size != int(region_shape[0]) or (rescale is not None and rescale.numel() != int(region_shape[0])):
            raise ConfigError(f"{label}: {mod.algo.upper()} module {mod.name} rotates {mod.out_size} rows but the "
                              f"{ckpt_name} weight has {int(region_shape[0])}; is the network for another model?")
        return
    own = mod.weight_shape()
    scale = mod.parts.get("dora_scale")
    if scale is not None and scale.numel() not in (int(region_shape[0]), int(region_shape[1])):
        raise ConfigError(f"{label}: DoRA module {mod.name} has a dora_scale of {scale.numel()} values for the "
                          f"{ckpt_name} weight {tuple(region_shape)}; the file is damaged or for another model")
    if _numel(own) != _numel(region_shape) or int(own[0]) != int(region_shape[0]):
        hint = {"sdxl": " (a network for SD1/SD2 on an SDXL model?)",
                "flux": " (a network for another FLUX.1 size, or for another model?)"}.get(
                    family, " (an SD1 network on an SD2 model or the reverse?)")
        raise ConfigError(f"{label}: module {mod.name} is shaped {tuple(own)} but the {ckpt_name} weight is "
                          f"{tuple(region_shape)}{hint}")


@dataclass
class MergePlan:
    """Which modules change which checkpoint tensors: ``weights[key]`` / ``biases[key]`` -> [(network, module,
    target)], in network order."""

    family: str | None
    weights: dict[str, list[tuple[NetworkInput, NetModule, LdmTarget]]] = field(default_factory=dict)
    biases: dict[str, list[tuple[NetworkInput, NetModule, LdmTarget]]] = field(default_factory=dict)
    report: CheckpointMergeReport = field(default_factory=CheckpointMergeReport)


def _bias_delta_of(mod: NetModule):
    return mod.parts.get("diff_b") if mod.algo == "full" else mod.parts.get("b_norm") if mod.algo == "norm" else None


def plan_merge(shapes: Mapping[str, tuple], networks: Sequence[NetworkInput], ckpt_name: str = "checkpoint") -> MergePlan:
    """Match every network's modules to the checkpoint's tensors (``shapes``: key -> shape) and check their shapes."""
    family, lora_map = checkpoint_lora_map(shapes)
    plan = MergePlan(family)
    for net in networks:
        unmatched = []
        count = 0
        for name, mod in net.modules.items():
            target = _find(lora_map, name)
            if target is None:
                unmatched.append(name)
                continue
            region = shapes[target.weight_key]
            if target.rows is not None:
                region = (target.rows[1] - target.rows[0],) + tuple(region[1:])
            _check_shape(net.label, mod, region, ckpt_name, family)
            plan.weights.setdefault(target.weight_key, []).append((net, mod, target))
            if _bias_delta_of(mod) is not None and target.bias_key is not None:
                plan.biases.setdefault(target.bias_key, []).append((net, mod, target))
            count += 1
        if count == 0:
            raise ConfigError(f"{net.label}: none of its {len(net.modules)} modules matches a layer of {ckpt_name} "
                              f"(is it a network for {_OTHER_FAMILIES.get(family, 'SDXL')} or another model?)")
        plan.report.merged[net.label] = count
        plan.report.unmatched[net.label] = unmatched
    return plan


def merged_weight(weight: torch.Tensor, items, device=None) -> torch.Tensor:
    """``weight`` with the deltas of ``items`` (a :class:`MergePlan` entry) added, in float32 on ``device``."""
    w32 = weight.to(device=device if device is not None else weight.device, dtype=torch.float32, copy=True)
    base = w32.clone() if any(m.algo in ("ia3", "glora") for _, m, _ in items) else w32
    for net, mod, target in items:
        rows = slice(*target.rows) if target.rows is not None else slice(None)
        region = w32[rows]
        if mod.algo == "ia3":
            on_input = bool(int(mod.parts["on_input"].reshape(-1)[0])) if "on_input" in mod.parts else False
            region += net.ratio * lm.ia3_delta(base[rows], mod.parts["weight"].to(w32.device).float(), on_input)
        elif mod.algo == "glora":
            region += net.ratio * mod.to(w32.device).base_delta(base[rows])
        elif mod.transforms_base:
            region.copy_(mod.to(w32.device).merged_weight(region, net.ratio))
        elif mod.algo == "norm":
            region += net.ratio * mod.parts["w_norm"].to(w32.device).float().reshape(region.shape)
        else:
            m = mod.to(w32.device) if device is not None else mod
            region += net.ratio * m.delta(region.shape)
    return w32


def merged_bias(bias: torch.Tensor, items, device=None) -> torch.Tensor:
    """``bias`` with the bias deltas (full ``diff_b``, norm ``b_norm``) of ``items`` added, in float32."""
    b32 = bias.to(device=device if device is not None else bias.device, dtype=torch.float32, copy=True)
    for net, mod, target in items:
        rows = slice(*target.rows) if target.rows is not None else slice(None)
        b32[rows] += net.ratio * _bias_delta_of(mod).to(b32.device).float().reshape(b32[rows].shape)
    return b32


def merge_into_checkpoint(checkpoint: dict, networks: Sequence[NetworkInput], device=None, ckpt_name: str = "checkpoint",
                          progress: Callable[[int, int], None] | None = None) -> CheckpointMergeReport:
    """Add every network's deltas to ``checkpoint`` (modified in place; see the module docstring)."""
    plan = plan_merge({k: tuple(v.shape) for k, v in checkpoint.items()}, networks, ckpt_name)
    total = len(plan.weights)
    for done, (key, items) in enumerate(plan.weights.items()):
        weight = checkpoint[key]
        checkpoint[key] = merged_weight(weight, items, device).to(dtype=weight.dtype, device="cpu")
        plan.report.weights_changed += 1
        if progress:
            progress(done + 1, total)
    for key, items in plan.biases.items():
        checkpoint[key] = merged_bias(checkpoint[key], items, device).to(dtype=checkpoint[key].dtype, device="cpu")
    return plan.report


def checkpoint_dtype(name, setting: str = "save_precision"):
    """The output dtype asked for a merged checkpoint: float/fp16/bf16 as for LoRA files, or ``fp8`` (float8 e4m3,
    ComfyUI's fp8 checkpoints: the merged weights are rounded to float8). None keeps each tensor's own."""
    from sd_scripts.files.lora_file import precision_dtype

    if isinstance(name, str) and name.strip().lower() in ("fp8", "fp8_e4m3fn", "float8_e4m3fn"):
        return torch.float8_e4m3fn
    return precision_dtype(name, setting)


def _output_dtype(dtype: torch.dtype, chosen) -> torch.dtype:
    """A floating tensor's dtype in the merged file: the one chosen, else its own, float8 upcast to bf16 (a small
    delta added to a float8 weight would mostly round away)."""
    if not dtype.is_floating_point:
        return dtype
    if chosen is not None:
        return chosen
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


def stream_merge_file(src, out, networks: Sequence[NetworkInput], dtype=None, device=None, metadata=None,
                      ckpt_name: str = "checkpoint", progress: Callable[[int, int], None] | None = None,
                      check: Callable[[MergePlan], None] | None = None) -> CheckpointMergeReport:
    """Merge into a .safetensors checkpoint and write a .safetensors file, one tensor at a time: the memory peak is
    a few copies of the largest tensor, whatever the model's size (a 12B FLUX.1 transformer is never held whole).
    ``check(plan)`` runs before anything is written."""
    from sd_scripts.files.safetensors_stream import SafetensorsReader, SafetensorsWriter

    with SafetensorsReader(src) as reader:
        plan = plan_merge(reader.shapes(), networks, ckpt_name)
        if check is not None:
            check(plan)
        entries = [(k, _output_dtype(reader.info(k).dtype, dtype), reader.info(k).shape) for k in reader.keys()]
        meta = dict(reader.metadata) | dict(metadata or {})
        total = len(plan.weights)
        with SafetensorsWriter(out, entries, meta) as writer:
            out_dtypes = {k: d for k, d, _ in entries}
            for key in writer.order:
                tensor = reader.read(key)
                if key in plan.weights:
                    tensor = merged_weight(tensor, plan.weights[key], device)
                    plan.report.weights_changed += 1
                    if progress:
                        progress(plan.report.weights_changed, total)
                elif key in plan.biases:
                    tensor = merged_bias(tensor, plan.biases[key], device)
                writer.write(key, tensor.to(dtype=out_dtypes[key], device="cpu"))
                del tensor
    return plan.report


def _check_v2(family: str, v2: bool | None, setting: str, path) -> None:
    if v2 and family != "sd2":
        what = {"sdxl": "an SDXL checkpoint (two text encoders)", "flux": "a FLUX.1 checkpoint"}.get(
            family, "an SD1 checkpoint (CLIP text encoder)")
        raise ConfigError(f"{setting}: --v2 was given but {path} is {what}; drop --v2", setting=setting)


def merge_lycoris_file(base, lycoris, save_to, weight: float = 1.0, v2: bool | None = None, dtype=None, device=None,
                       overwrite: bool = False, progress=None) -> CheckpointMergeReport:
    """``locon_loha_merge``: ``base`` checkpoint + ``weight`` x network -> ``save_to`` (same layout and dtypes,
    or every floating tensor cast to ``dtype``)."""
    return merge_networks_into_checkpoint_file(base, [lycoris], [weight], save_to, v2=v2, save_precision=dtype,
                                               device=device, overwrite=overwrite, model_setting="lycoris",
                                               ckpt_setting="base", dtype_setting="dtype", progress=progress)


def merge_networks_into_checkpoint_file(sd_model, models: Sequence, ratios: Sequence[float], save_to, v2: bool | None = None,
                                        save_precision=None, device=None, overwrite: bool = False,
                                        model_setting: str = "models", ckpt_setting: str = "sd_model",
                                        dtype_setting: str = "save_precision", progress=None) -> CheckpointMergeReport:
    """Read the checkpoint and the networks, merge, and write ``save_to`` atomically (nothing is written on error)."""
    import math

    from sd_scripts.networks.tool_io import (check_output_path, is_safetensors, load_network, read_checkpoint_header,
                                             read_sd_checkpoint, save_sd_checkpoint)

    if len(models) != len(ratios):
        raise ConfigError(f"ratios: {len(ratios)} ratios for {len(models)} models; give one ratio per model", setting="ratios")
    if any(not math.isfinite(float(r)) for r in ratios):
        raise ConfigError("ratios: every ratio must be a finite number", setting="ratios")
    out = check_output_path(save_to, "save_to", overwrite, exts=(".safetensors", ".ckpt"))
    dtype = checkpoint_dtype(save_precision, dtype_setting)
    nets = []
    for path, ratio in zip(models, ratios):
        modules, _ = load_network(path, model_setting, with_base=True)
        nets.append(NetworkInput(str(path), modules, float(ratio)))
    merged = {"merged_networks": json.dumps([{"file": str(n.label), "ratio": n.ratio} for n in nets])}
    if is_safetensors(sd_model) and is_safetensors(out):
        _, _, family = read_checkpoint_header(sd_model, ckpt_setting)
        _check_v2(family, v2, ckpt_setting, sd_model)
        return stream_merge_file(sd_model, out, nets, dtype, device, merged, str(sd_model), progress)
    state, metadata, family = read_sd_checkpoint(sd_model, ckpt_setting)
    _check_v2(family, v2, ckpt_setting, sd_model)
    report = merge_into_checkpoint(state, nets, device=device, ckpt_name=str(sd_model), progress=progress)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_sd_checkpoint(out, state, dict(metadata) | merged)
    return report
