"""kohya's ``ss_*`` training metadata for LoRA files.

All values are strings, as kohya writes them (``str(v)``: "True", "None", "0.0001").
``no_metadata`` keeps only the minimum set that UIs need to recognise the file.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.settings import engine_settings

__all__ = ["MINIMUM_KEYS", "build_training_metadata", "finish_metadata"]

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def _s(value: Any) -> str:
    return str(value)


def build_training_metadata(config: TrainConfig, *, family, v_parameterization: bool, dataset, network_dim, network_alpha,
                            network_args: dict, optimizer_name: str, num_batches_per_epoch: int,
                            num_train_epochs: int, max_train_steps: int, lr_warmup_steps: int,
                            num_processes: int, model_hashes: dict[str, str]) -> dict[str, str]:
    """Everything known at the start of training; :func:`finish_metadata` adds the per-save keys."""
    md: dict[str, Any] = {
        "ss_session_id": random.SystemRandom().randint(0, 2**32),
        "ss_training_started_at": time.time(),
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_num_validation_images": getattr(getattr(dataset, "plan", None), "num_validation_images", 0),
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_train_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_v2": family.ss_v2,
        "ss_base_model_version": family.base_model_version(v_parameterization),
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_optimizer": optimizer_name,
        "ss_face_crop_aug_range": None,
        "ss_total_batch_size": config.train_batch_size * num_processes * config.gradient_accumulation_steps,
        "ss_resolution": _resolution_tuple(config.resolution),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(getattr(dataset, "reg_dataset_dirs", {}) or {}),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info),
    }
    # the settings declared with an ss_* key (sd_scripts/core/settings.py), as their values, read by their names
    md.update({s.metadata: getattr(config, s.kohya_name) for s in engine_settings() if s.metadata})
    # kohya's current train_network.py writes neither key; LoRA metadata viewers show ss_masked_loss, so a
    # masked run says so (only then, so unmasked files keep kohya's key set)
    subsets = getattr(getattr(dataset, "plan", None), "subsets", None) or []
    if config.alpha_mask:
        md["ss_alpha_mask"] = True
    if config.masked_loss or any(getattr(s, "alpha_mask", False) for s in subsets):
        md["ss_masked_loss"] = True
    if config.dataset_config and hasattr(dataset, "datasets_metadata"):
        # kohya with a dataset TOML: every dataset and subset in one JSON list (the flat keys above stay too)
        md["ss_datasets"] = json.dumps(dataset.datasets_metadata())
    md.update(family.metadata(config))  # the family's own keys (FLUX.1: ss_guidance_scale, ss_timestep_sampling ...)
    if network_args:
        md["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    model_path = config.pretrained_model_name_or_path
    if model_path:
        md["ss_sd_model_name"] = os.path.basename(os.path.normpath(model_path))
        md.update({k: v for k, v in model_hashes.items() if k.startswith("ss_")})
    if config.vae:
        md["ss_vae_name"] = os.path.basename(os.path.normpath(config.vae))
    metadata = {k: _s(v) for k, v in md.items()}
    if config.no_metadata:
        metadata = {k: v for k, v in metadata.items() if k in MINIMUM_KEYS}
    return metadata


def finish_metadata(metadata: dict[str, str], *, step: int, epoch: int, no_metadata: bool) -> dict[str, str]:
    out = dict(metadata)
    if not no_metadata:
        out["ss_training_finished_at"] = str(time.time())
        out["ss_steps"] = str(step)
        out["ss_epoch"] = str(epoch)
    return out


def _resolution_tuple(resolution: str) -> tuple[int, int]:
    parts = [int(p) for p in str(resolution).split(",")]
    return (parts[0], parts[-1])
