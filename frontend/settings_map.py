"""ArgStore -> the engine's TrainConfig (kohya names): the one place the two vocabularies meet.

Besides renaming (``net_dim`` -> ``network_dim``, ``img_folder`` -> ``train_data_dir``, ...) it turns
the 2023 tool's compound settings into kohya's: width and height into ``resolution`` "W,H", the
warm-up ratio into ``lr_warmup_steps``, ``lyco``/``network_args`` into ``network_module`` and
``key=value`` lists, epochs or steps into one length. It also applies the fallbacks for defaults
that cannot run on this machine (fp16 and 8-bit optimizers without CUDA, xformers when it is not
installed) and reports them in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NAME_MAP", "FRONT_END_ONLY", "Mapped", "to_train_config", "unsupported_settings", "kohya_name", "output_name_of"]

# ArgStore name -> TrainConfig (kohya) name, where they differ.
NAME_MAP = {
    "base_model": "pretrained_model_name_or_path",
    "img_folder": "train_data_dir",
    "shuffle_captions": "shuffle_caption",
    "train_resolution": "resolution",
    "buckets": "enable_bucket",
    "min_bucket_resolution": "min_bucket_reso",
    "max_bucket_resolution": "max_bucket_reso",
    "reg_img_folder": "reg_data_dir",
    "output_folder": "output_dir",
    "change_output_name": "output_name",
    "batch_size": "train_batch_size",
    "max_clip_token_length": "max_token_length",
    "max_steps": "max_train_steps",
    "num_epochs": "max_train_epochs",
    "num_workers": "max_data_loader_n_workers",
    "persistent_workers": "persistent_data_loader_workers",
    "test_seed": "seed",
    "gradient_acc_steps": "gradient_accumulation_steps",
    "log_dir": "logging_dir",
    "scheduler": "lr_scheduler",
    "cosine_restarts": "lr_scheduler_num_cycles",
    "scheduler_power": "lr_scheduler_power",
    "no_meta": "no_metadata",
    "save_as": "save_model_as",
    "lora_model_for_resume": "network_weights",
    "net_dim": "network_dim",
    "alpha": "network_alpha",
    "unet_only": "network_train_unet_only",
    "text_only": "network_train_text_encoder_only",
    "warmup_lr_ratio": "lr_warmup_steps",
    "height_resolution": "resolution",
    "lyco": "network_module",
    "use_8bit_adam": "optimizer_type",
    "use_lion": "optimizer_type",
    "locon": "network_args",
    "locon_dim": "network_args",
    "locon_alpha": "network_args",
}

# Settings the front end itself acts on; the engine never sees them.
FRONT_END_ONLY = {
    "save_json_folder", "save_json_name", "load_json_path", "multi_run_folder", "json_load_skip_list",
    "save_json_only", "tag_occurrence_txt_file", "sort_tag_occurrence_alphabetically",
    "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
    "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
    "wandb_api_key", "status_port", "status_listen", "queue_state_every",
}



def output_name_of(store: Any) -> str:
    """The LoRA's file name without extension: change_output_name, or "last" as in the 2023 tool."""
    return store.change_output_name or "last"


_EIGHT_BIT_FALLBACK = {"AdamW8bit": "AdamW", "PagedAdamW8bit": "AdamW", "Lion8bit": "Lion",
                       "SGDNesterov8bit": "SGDNesterov"}
_NO_BETAS = {"AdaFactor", "SGDNesterov", "SGDNesterov8bit"}


def kohya_name(name: str) -> str:
    return NAME_MAP.get(name, name)


def _config_fields() -> dict[str, dataclasses.Field]:
    from sd_scripts.core.config import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def unsupported_settings(store: Any) -> list[tuple[str, str]]:
    """Settings that are set but that neither the front end nor the engine can honour."""
    fields = _config_fields()
    out = []
    for info in store.settings():
        if info.name in FRONT_END_ONLY or info.deprecated:
            continue
        if kohya_name(info.name) in fields:
            continue
        value = getattr(store, info.name)
        if value is None or value is False:
            continue
        out.append((info.name, "not supported by this trainer's engine yet; remove it from your settings"))
    return out


@dataclass
class Mapped:
    config: Any
    store: Any  # the ArgStore after fallbacks: what actually runs
    notes: list[str] = field(default_factory=list)


def _kv_list(args: dict | None) -> list[str]:
    out = []
    for key, value in (args or {}).items():
        if isinstance(value, bool):
            text = "True" if value else "False"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        out.append(f"{key}={text}")
    return out


def _detect_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _detect_xformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


def apply_fallbacks(store: Any, has_cuda: bool, has_xformers: bool) -> tuple[Any, str | None]:
    """Swap defaults that cannot run here for ones that can; return the store and one line saying so."""
    changes = []
    updates: dict[str, Any] = {}
    if not has_cuda:
        if store.mixed_precision == "fp16":
            updates["mixed_precision"] = "no"
            changes.append("mixed_precision fp16 -> no")
            if getattr(store, "full_fp16", False):
                updates["full_fp16"] = False
                changes.append("full_fp16 -> off")
        for name in ("fp8_base", "fp8_base_unet"):  # float8 weights need CUDA's autocast
            if getattr(store, name, False):
                updates[name] = False
                changes.append(f"{name} -> off")
        if store.optimizer_type in _EIGHT_BIT_FALLBACK:
            updates["optimizer_type"] = _EIGHT_BIT_FALLBACK[store.optimizer_type]
            changes.append(f"optimizer_type {store.optimizer_type} -> {updates['optimizer_type']}")
    if store.xformers and not (has_cuda and has_xformers):
        updates["xformers"] = False
        changes.append("xformers -> off (PyTorch SDPA attention)")
    if not changes:
        return store, None
    reason = "no CUDA GPU found" if not has_cuda else "xformers is not installed"
    return store.replace(**updates), f"note: {reason}, so: " + ", ".join(changes)


def to_train_config(store: Any, *, has_cuda: bool | None = None, has_xformers: bool | None = None) -> Mapped:
    """Build the engine's TrainConfig from a checked ArgStore."""
    from sd_scripts.core.config import TrainConfig

    if has_cuda is None:
        has_cuda = _detect_cuda()
    if has_xformers is None:
        has_xformers = _detect_xformers()
    store, fallback_note = apply_fallbacks(store, has_cuda, has_xformers)
    notes = [fallback_note] if fallback_note else []
    fields = _config_fields()
    values: dict[str, Any] = {}

    special = {"train_resolution", "height_resolution", "warmup_lr_ratio", "optimizer_type", "optimizer_args",
               "lr_scheduler_args", "lyco", "network_args", "network_module", "v2", "v_parameterization", "sdxl",
               "max_steps", "num_epochs", "persistent_workers", "caption_extension", "change_output_name"}
    for info in store.settings():
        name = info.name
        if name in FRONT_END_ONLY or name in special or info.deprecated:
            continue
        target = kohya_name(name)
        if target not in fields:
            continue  # unsupported_settings() refuses these when they are set
        value = getattr(store, name)
        if value is None and _field_default(fields[target]) is not None:
            continue  # "not set": keep the engine's own default
        values[target] = value

    if store.base_weights_multiplier is not None:  # a list setting holds text; preflight names what is no number
        values["base_weights_multiplier"] = [_number_or_text(v) for v in store.base_weights_multiplier]
    width, height = store.train_resolution, store.height_resolution
    values["resolution"] = f"{width},{height}" if height and height != width else str(width)
    values["lr_warmup_steps"] = store.warmup_lr_ratio or 0
    if store.max_steps:
        values["max_train_steps"] = store.max_steps
        values["max_train_epochs"] = None
    else:
        values["max_train_epochs"] = store.num_epochs
    values["persistent_data_loader_workers"] = bool(store.persistent_workers and store.num_workers > 0)
    extension = store.caption_extension.strip()
    values["caption_extension"] = extension if extension.startswith(".") else "." + extension
    values["output_name"] = output_name_of(store)
    values["v2"] = True if store.v2 else None
    values["v_parameterization"] = True if store.v_parameterization else None
    values["sdxl"] = True if store.sdxl else None  # false: the engine detects the family from the model

    optimizer = store.optimizer_type
    optimizer_args = dict(store.optimizer_args or {})
    if optimizer in _NO_BETAS:
        optimizer_args.pop("betas", None)
    if optimizer == "DAdaptation":
        optimizer_args.setdefault("decouple", "True")
    values["optimizer_type"] = optimizer
    values["optimizer_args"] = _kv_list(optimizer_args)
    values["lr_scheduler_args"] = _kv_list(store.lr_scheduler_args)

    network_args = dict(store.network_args or {})
    if store.lyco:
        module = "lycoris.kohya"
    elif "unit" in network_args:
        module = "networks.dylora"
    else:
        module = store.network_module
        if module.startswith("sd_scripts."):
            module = module[len("sd_scripts."):]
    values["network_module"] = module
    values["network_args"] = _kv_list(network_args)

    config = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    return Mapped(config=config, store=store, notes=notes)


def _number_or_text(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
