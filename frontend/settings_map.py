"""ArgStore -> the engine's TrainConfig (kohya names): the one place the two vocabularies meet.

Besides renaming (``net_dim`` -> ``network_dim``, ``img_folder`` -> ``train_data_dir``, ...) it turns
the 2023 tool's compound settings into kohya's: width and height into ``resolution`` "W,H", the
warm-up ratio into ``lr_warmup_steps``, ``lyco``/``network_args`` into ``network_module`` and
``key=value`` lists, epochs or steps into one length. It also applies the fallbacks for defaults
that cannot run on this machine (fp16 and 8-bit optimizers without CUDA, xformers when it is not
installed) and reports them in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.settings import front_settings

__all__ = ["NAME_MAP", "FRONT_END_ONLY", "Mapped", "to_train_config", "unsupported_settings", "output_name_of"]

# ArgStore name -> TrainConfig (kohya) name, where they differ (also the compound settings' targets).
NAME_MAP = {s.name: s.feeds or s.kohya_name for s in front_settings()
            if (s.feeds or s.kohya_name or s.name) != s.name}

# Settings the front end itself acts on; the engine never sees them.
FRONT_END_ONLY = {s.name for s in front_settings() if s.layer == "front" and not s.feeds and not s.deprecated}


def output_name_of(store: Any) -> str:
    """The LoRA's file name without extension: change_output_name, or "last" as in the 2023 tool."""
    return store.change_output_name or "last"


_EIGHT_BIT_FALLBACK = {"AdamW8bit": "AdamW", "PagedAdamW8bit": "AdamW", "Lion8bit": "Lion",
                       "SGDNesterov8bit": "SGDNesterov"}
_NO_BETAS = {"AdaFactor", "SGDNesterov", "SGDNesterov8bit"}


def unsupported_settings(store: Any) -> list[tuple[str, str]]:
    """Settings that are set but that neither the front end nor the engine can honour."""
    out = []
    for decl in front_settings():
        if decl.layer != "none":
            continue
        value = getattr(store, decl.name)
        if value is None or value is False:
            continue
        out.append((decl.name, "not supported by this trainer's engine yet; remove it from your settings"))
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
        if getattr(store, "blocks_to_swap", 0):  # the blocks would be copied from RAM to RAM
            updates["blocks_to_swap"] = 0
            changes.append(f"blocks_to_swap {store.blocks_to_swap} -> 0")
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
    values: dict[str, Any] = {}

    special = {"train_resolution", "height_resolution", "warmup_lr_ratio", "optimizer_type", "optimizer_args",
               "lr_scheduler_args", "lyco", "network_args", "network_module", "v2", "v_parameterization", "sdxl",
               "max_steps", "num_epochs", "persistent_workers", "caption_extension", "change_output_name"}
    for decl in front_settings():
        if not decl.in_engine or decl.name in special or decl.deprecated:
            continue
        value = getattr(store, decl.name)
        if value is None and decl.engine_default is not None:
            continue  # "not set": keep the engine's own default
        values[decl.kohya_name] = value

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

    config = TrainConfig(**values)
    return Mapped(config=config, store=store, notes=notes)


def _number_or_text(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
