"""Preflight's check of free disk space: how much a run will write (the LoRA files and training states, estimated
from the model's layer shapes and ``network_dim``; the on-disk latent and text-encoder caches; sample images; logs)
against what each file system has free."""

from __future__ import annotations

import math
import os
import shutil
from functools import partial
from typing import Any, Callable

from sd_scripts.core.config import TrainConfig, is_whole_number as _is_int
from sd_scripts.core.errors import UserError
from sd_scripts.core.problems import Problems
from sd_scripts.data.dataset_plan import DatasetPlan

from .paths import existing_ancestor
from .plan import DiskNeed, Plan

__all__ = ["check_disk_space", "estimate_lora_bytes", "steps_and_epochs"]

# LoRA parameters per unit of rank (UNet attention/feed-forward + text encoder, no conv), used when
# the model's layer shapes cannot be read cheaply (a .bin diffusers folder, a hub id).
_PARAMS_PER_RANK = {"sd1": 600_000, "sd2": 700_000, "sdxl": 2_900_000}
_CONV_PARAMS_PER_RANK = {"sd1": 1_600_000, "sd2": 1_600_000, "sdxl": 4_000_000}
_LATENT_CHANNELS = 4
_PNG_BYTES_PER_PIXEL = 2.0  # generated sample images compress little: about 2 of the 3 bytes per RGB pixel
_LOG_BYTES_PER_STEP = 512  # TensorBoard scalars per step: losses and one lr per parameter group


def _header_shapes(path: str) -> dict | None:
    from sd_scripts.models.loading import _read_safetensors_header

    try:
        shapes, _ = _read_safetensors_header(path, "pretrained_model_name_or_path")
    except UserError:
        return None
    return shapes


def _lora_params_from_shapes(shapes: dict, linear_rank: int, conv_rank: int | None, unet: bool, te: bool,
                             ldm: bool) -> int:
    """LoRA parameter count of kohya's targets in a checkpoint whose keys/shapes are ``shapes``."""
    import re

    from sd_scripts.networks.ldm_lora_map import _TE_TARGET, _UNET_TARGET, build_lora_map

    total = 0

    def module_params(shape: tuple, rank: int) -> int:
        if len(shape) == 2:
            return rank * (shape[0] + shape[1])
        if len(shape) == 4:
            return rank * (shape[1] * shape[2] * shape[3] + shape[0])
        return 0

    def wanted(shape: tuple, name: str = "", conv_only: bool | None = None) -> int | None:
        # kohya: ResnetBlock2D / Down- and Upsample2D layers are trained only with conv_dim (LoCon)
        if conv_only is None:
            conv_only = "resnets" in name or "samplers" in name
        if conv_only and not conv_rank:
            return None
        if len(shape) == 4 and (shape[2] > 1 or shape[3] > 1):
            return conv_rank
        return linear_rank

    if ldm:
        for name, target in build_lora_map(shapes).items():
            if not target.lora_target or (target.part == "unet" and not unet) or (target.part == "te" and not te):
                continue
            shape = tuple(shapes[target.weight_key])
            if target.rows is not None:
                shape = (target.rows[1] - target.rows[0], *shape[1:])
            rank = wanted(shape, name, getattr(target, "conv_only", None))
            if rank:
                total += module_params(shape, rank)
        return total
    te_key = re.compile(r"^(text_model\.)?")
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        is_unet = bool(_UNET_TARGET.search(path))
        is_te = bool(_TE_TARGET.search(te_key.sub("", path)))
        if (is_unet and unet) or (is_te and te):
            rank = wanted(tuple(shape), path)
            if rank:
                total += module_params(tuple(shape), rank)
    return total


def _network_ranks(config) -> tuple[int, int | None]:
    dim = config.network_dim if _is_int(config.network_dim) and config.network_dim > 0 else 4
    conv = None
    for item in config.network_args or []:
        key, _, value = str(item).partition("=")
        if key.strip() == "conv_dim":
            try:
                conv = int(float(value))
            except ValueError:
                conv = None
    if conv is None and str(config.network_module or "").startswith("lycoris"):
        conv = dim  # LyCORIS trains the convs by default (with conv_dim = dim unless set)
    return dim, conv


def estimate_lora_bytes(config, family=None, model_info: dict | None = None) -> int:
    """Roughly how big one saved LoRA file will be, from ``network_dim`` (and ``conv_dim``) and the
    model's layer shapes (read from safetensors headers), else from per-family averages."""
    dim, conv = _network_ranks(config)
    unet = not config.network_train_text_encoder_only
    te = not config.network_train_unet_only
    info = model_info or {}
    params = None
    try:
        if info.get("kind") == "single_file" and info.get("format") == "safetensors":
            shapes = _header_shapes(info["path"])
            if shapes:
                params = _lora_params_from_shapes(shapes, dim, conv, unet, te, ldm=True)
        elif info.get("kind") == "diffusers":
            total, found = 0, False
            for sub, part in (("unet", "unet"), ("text_encoder", "te"), ("text_encoder_2", "te")):
                folder = os.path.join(info["path"], sub)
                if not os.path.isdir(folder):
                    continue
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
                for f in files:
                    shapes = _header_shapes(os.path.join(folder, f))
                    if shapes:
                        found = True
                        total += _lora_params_from_shapes(shapes, dim, conv, unet and part == "unet",
                                                          te and part == "te", ldm=False)
                    break  # one file per component (a variant is a copy)
            params = total if found else None
    except Exception:  # noqa: BLE001 - an estimate must never stop a run
        params = None
    if not params:  # unreadable shapes, or key names this estimate does not know
        name = getattr(family, "name", "sd1")
        share = (0.75 if unet else 0.0) + (0.25 if te else 0.0)
        params = int(_PARAMS_PER_RANK.get(name, 600_000) * dim * share)
        if conv and unet:
            params += _CONV_PARAMS_PER_RANK.get(name, 1_600_000) * conv
    element = 4 if config.save_precision in (None, "float", "fp32") else 2
    return int(params * element) + 64 * 1024  # + header and metadata


def steps_and_epochs(config: TrainConfig, dataset: DatasetPlan | None) -> tuple[int, int]:
    images = dataset.num_train_images + dataset.num_reg_images if dataset is not None else 0
    batch = config.train_batch_size if _is_int(config.train_batch_size) and config.train_batch_size > 0 else 1
    accumulate = config.gradient_accumulation_steps if _is_int(config.gradient_accumulation_steps) and \
        config.gradient_accumulation_steps > 0 else 1
    per_epoch = max(1, math.ceil(max(images, 1) / batch / accumulate))
    if _is_int(config.max_train_epochs) and config.max_train_epochs > 0:
        return config.max_train_epochs * per_epoch, config.max_train_epochs
    steps = config.max_train_steps if _is_int(config.max_train_steps) and config.max_train_steps > 0 else 1
    return steps, max(1, math.ceil(steps / per_epoch))


def _count_saves(config, steps: int, epochs: int) -> tuple[int, int]:
    """(LoRA files, training states) kept at the end of the run, at most."""
    every_epochs = config.save_every_n_epochs
    if config.save_n_epoch_ratio and not every_epochs:
        every_epochs = max(1, epochs // config.save_n_epoch_ratio)
    epoch_saves = epochs // every_epochs if _is_int(every_epochs) and every_epochs > 0 else 0
    step_saves = steps // config.save_every_n_steps if _is_int(config.save_every_n_steps) and \
        config.save_every_n_steps > 0 else 0
    loras_epoch = min(epoch_saves, config.save_last_n_epochs) if config.save_last_n_epochs else epoch_saves
    loras_step = step_saves
    if config.save_last_n_steps and _is_int(config.save_every_n_steps) and config.save_every_n_steps > 0:
        loras_step = min(step_saves, config.save_last_n_steps // config.save_every_n_steps + 1)
    states = 0
    if config.save_state:
        state_epochs = min(epoch_saves, config.save_last_n_epochs_state) if config.save_last_n_epochs_state else \
            loras_epoch
        states = 1 + state_epochs + loras_step
    return 1 + loras_epoch + loras_step, states


def _latent_cache_bytes(config: TrainConfig, dataset: DatasetPlan) -> int:
    from sd_scripts.data.dataset_layout import parse_resolution

    try:
        width, height = parse_resolution(config.resolution)
    except UserError:
        width = height = 512
    records = dataset.images
    images = len(records)
    per_image = _LATENT_CHANNELS * (width // 8) * (height // 8) * 4  # float32, bucket area ~ resolution area
    copies = 2 if config.flip_aug else 1
    subsets = dataset.subsets
    masked = sum(1 for r in records if r.subset < len(subsets) and subsets[r.subset].alpha_mask)
    return images * (per_image * copies + 2048) + masked * width * height * 4  # alpha masks: float32 at image size


def _sample_bytes(config, steps: int, epochs: int) -> int:
    """Sample images (and one grid per sampling point) written to ``<output_dir>/sample`` over the run."""
    events = 0
    if _is_int(config.sample_every_n_epochs) and config.sample_every_n_epochs > 0:
        events = epochs // config.sample_every_n_epochs
    elif _is_int(config.sample_every_n_steps) and config.sample_every_n_steps > 0:
        events = steps // config.sample_every_n_steps
    events += 1 if config.sample_at_first else 0
    if not events or not config.sample_prompts or not os.path.isfile(config.sample_prompts):
        return 0
    from sd_scripts.training.sampling import load_sample_prompts

    try:
        prompts = [p.normalise() for p in load_sample_prompts(config.sample_prompts)]
    except Exception:  # noqa: BLE001 - a bad prompt file is reported by preflight; an estimate never stops a run
        return 0
    pixels = sum(p.width * p.height for p in prompts)
    if len(prompts) > 1:
        pixels *= 2  # the grid holds every image again
    return int(events * pixels * _PNG_BYTES_PER_PIXEL)


def _te_cache_bytes(config: TrainConfig, family, dataset: DatasetPlan) -> int:
    """Text-encoder outputs on disk: float32 hidden states (and a pooled vector) per caption, one caption per image
    at most."""
    tokens = config.max_token_length + 2 if _is_int(config.max_token_length) else 77
    per_caption = tokens * getattr(family, "context_dim", 768) * 4 + 1280 * 4 + 1024
    return len(dataset.images) * per_caption


def _folder_bytes(folder: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def check_disk_space(config, plan: Plan, problems: Problems | None = None
                     ) -> tuple[list[UserError], list[str], list[DiskNeed]]:
    """(errors, warnings, needs): free space for the LoRA files, states, latent and text-encoder caches, sample
    images and logs (the errors and warnings are recorded in ``problems`` too, when given).

    An error names the setting whose folder is on the full disk when the free space is below the
    estimate; a warning when it is below twice the estimate. Uses ``shutil.disk_usage`` (tests
    monkeypatch it).
    """
    if not config.output_dir or (os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir)):
        return [], [], []
    steps, epochs = steps_and_epochs(config, plan.dataset)
    needs = _Needs()
    _add_saved_files(needs, config, plan, steps, epochs)
    _add_latent_cache(needs, config, plan)
    samples = _sample_bytes(config, steps, epochs)
    needs.add(os.path.join(config.output_dir, "sample"), "output_dir", samples,
              f"sample images of about {_human(samples)}")
    _add_te_cache(needs, config, plan)
    if config.logging_dir:
        logs = steps * _LOG_BYTES_PER_STEP
        needs.add(config.logging_dir, "logging_dir", logs, f"training logs of about {_human(logs)}")
    problems = Problems() if problems is None else problems
    found = len(problems.errors), len(problems.warnings)
    for need in needs.by_device.values():
        _check_free_space(need, problems)
    return problems.errors[found[0]:], problems.warnings[found[1]:], list(needs.by_device.values())


class _Needs:
    """The bytes a run writes, per disk (the device of the folder's nearest existing ancestor)."""

    def __init__(self) -> None:
        self.by_device: dict[Any, DiskNeed] = {}

    def add(self, folder: str, setting: str, amount: int, part: str) -> None:
        if amount <= 0:
            return
        anchor = existing_ancestor(folder)
        if anchor is None:
            return
        try:
            device = os.stat(anchor).st_dev
        except OSError:
            return
        need = self.by_device.setdefault(device, DiskNeed(path=anchor, setting=setting))
        need.bytes += amount
        need.parts.append(part)


def _add_saved_files(needs: _Needs, config, plan: Plan, steps: int, epochs: int) -> None:
    """The LoRA files and training states saved in ``output_dir``."""
    lora = estimate_lora_bytes(config, plan.family, plan.model_info)
    n_loras, n_states = _count_saves(config, steps, epochs)
    needs.add(config.output_dir, "output_dir", lora * n_loras,
              f"{n_loras} LoRA files of about {_human(lora)}" if n_loras > 1 else f"a LoRA file of about {_human(lora)}")
    if n_states:
        # network weights in float32 plus optimizer state (two moments for Adam-like optimizers)
        state = (lora if config.save_precision in (None, "float", "fp32") else lora * 2) * 3
        needs.add(config.output_dir, "output_dir", state * n_states,
                  f"{n_states} training state(s) of about {_human(state)}")


def _add_latent_cache(needs: _Needs, config, plan: Plan) -> None:
    if config.cache_latents_to_disk and plan.dataset is not None:
        from sd_scripts.data.latent_cache import latent_cache_dir, resolve_cache_dir

        setting = "latent_cache_dir" if latent_cache_dir(config) else "output_dir"
        _add_cache(needs, partial(resolve_cache_dir, config, plan.dataset), setting,
                   partial(_latent_cache_bytes, config, plan.dataset), "a latent cache")


def _add_te_cache(needs: _Needs, config, plan: Plan) -> None:
    if config.cache_text_encoder_outputs_to_disk and plan.dataset is not None:
        from sd_scripts.data.te_cache import resolve_te_cache_dir

        _add_cache(needs, partial(resolve_te_cache_dir, config, plan.dataset), "output_dir",
                   partial(_te_cache_bytes, config, plan.family, plan.dataset), "a text-encoder cache")


def _add_cache(needs: _Needs, resolve: Callable[[], str | None], setting: str, estimate: Callable[[], int],
               what: str) -> None:
    """An on-disk cache in the folder ``resolve()`` names (none where it refuses the settings: reported by the
    cache's own checks), less what a previous run left there (mostly reused)."""
    try:
        folder = resolve()
    except UserError:
        folder = None
    if folder:
        amount = estimate()
        if os.path.isdir(folder):
            amount -= _folder_bytes(folder)
        needs.add(folder, setting, amount, f"{what} of about {_human(max(amount, 0))}")


def _check_free_space(need: DiskNeed, problems: Problems) -> None:
    """An error below the estimate, a warning below twice the estimate."""
    try:
        free = shutil.disk_usage(need.path).free
    except OSError:
        return
    what = ", ".join(need.parts)
    if free < need.bytes:
        problems.error(need.setting, f"not enough free disk space in {need.path}: {_human(free)} free, this run "
                       f"needs about {_human(need.bytes)} ({what}); free some space or choose an {need.setting} "
                       "on another disk")
    elif free < 2 * need.bytes:
        problems.warn(f"{need.setting}: disk space is short in {need.path}: {_human(free)} free, this run "
                      f"needs about {_human(need.bytes)} ({what})")
