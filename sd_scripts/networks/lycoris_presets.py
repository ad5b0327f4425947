"""lycoris-lora itself: importing it quietly, its built-in presets (fixed for diffusers' UNet), the class-level preset
state of ``LycorisNetworkKohya`` set for one build and put back afterwards, and its log records.

What the preset fixes are and why: the docstring of :mod:`.lycoris_adapter`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sd_scripts.networks.lycoris_args import LYCORIS_PRESETS, LycorisArgs, read_preset_file
from sd_scripts.networks.network_args import bad_arg

__all__ = ["import_lycoris", "builtin_preset", "resolve_preset", "lycoris_logs", "lycoris_preset"]

_CLASS_ATTRS = {
    "enable_conv": ("ENABLE_CONV", True),
    "unet_target_module": ("UNET_TARGET_REPLACE_MODULE", []),
    "unet_target_name": ("UNET_TARGET_REPLACE_NAME", []),
    "text_encoder_target_module": ("TEXT_ENCODER_TARGET_REPLACE_MODULE", []),
    "text_encoder_target_name": ("TEXT_ENCODER_TARGET_REPLACE_NAME", []),
    "module_algo_map": ("MODULE_ALGO_MAP", {}),
    "name_algo_map": ("NAME_ALGO_MAP", {}),
    "use_fnmatch": ("USE_FNMATCH", False),
    "exclude_name": ("TARGET_EXCLUDE_NAME", []),
}
_PRIVATE_PRESET = "_lets_current_preset"


@contextlib.contextmanager
def _quiet_imports():
    """bitsandbytes (imported by lycoris) logs a CPU-kernel warning on import; keep it out of the output."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_lycoris():
    """``(lycoris.kohya, lycoris.config)``, imported without bitsandbytes' import warning."""
    with _quiet_imports():
        import lycoris.kohya as kohya
        from lycoris import config
    return kohya, config


def builtin_preset(name: str) -> dict[str, Any]:
    """A built-in LyCORIS preset as a complete dict, fixed for diffusers UNets (see the module docstring)."""
    _, config = import_lycoris()
    preset = dict(config.PRESET[name])
    preset["unet_target_module"] = [m for m in preset.get("unet_target_module", []) if m != "TimestepEmbedding"]
    if name == "attn-only":
        preset["unet_target_module"] = preset["unet_target_module"] + ["Attention"]
    if name == "ia3":
        # LyCORIS matches target names against whole module paths with re.match, so the plain
        # "to_k" / "k_proj" ... of this preset match nothing in diffusers / transformers models.
        preset["use_fnmatch"] = True
        for key in ("unet_target_name", "text_encoder_target_name"):
            preset[key] = [f"*.{n}" for n in preset.get(key, [])]
        preset["name_algo_map"] = {f"*.{k}": v for k, v in preset.get("name_algo_map", {}).items()}
    return _complete(preset)


def _complete(preset: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: preset.get(key, default) for key, (_, default) in _CLASS_ATTRS.items()}
    out = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in out.items()}
    return out


def resolve_preset(args: LycorisArgs) -> dict[str, Any]:
    if args.preset in LYCORIS_PRESETS:
        preset = builtin_preset(args.preset)
    else:
        import_lycoris()
        from lycoris.config_sdk import PresetConfig, PresetValidationError

        data = read_preset_file(args.preset)
        try:
            preset = _complete(PresetConfig.from_dict(data).to_dict())
        except PresetValidationError as e:
            raise bad_arg("preset", args.preset, f"is not a valid LyCORIS preset ({e})") from None
    if args.enable_conv is False:
        preset["enable_conv"] = False
    return preset


@contextlib.contextmanager
def lycoris_logs(records: list[logging.LogRecord] | None = None):
    """Within the block, LyCORIS log records of level WARNING and above go to ``records`` (and the
    INFO chatter nowhere) instead of stdout."""
    import_lycoris()
    from lycoris.logging import logger

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if records is not None:
                records.append(record)

    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = [_Collect(logging.WARNING)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def lycoris_preset(preset: Mapping[str, Any], records: list[logging.LogRecord] | None = None):
    """Within the block, ``LycorisNetworkKohya`` has exactly ``preset`` (its class-level targets) and is
    known to ``create_network`` under a private preset name, which the block receives; LyCORIS log
    records go to ``records`` (see :func:`lycoris_logs`). Everything is put back afterwards."""
    kohya, config = import_lycoris()
    cls = kohya.LycorisNetworkKohya
    saved = {attr: cls.__dict__[attr] for attr, _ in _CLASS_ATTRS.values() if attr in cls.__dict__}
    full = _complete(preset)
    config.PRESET[_PRIVATE_PRESET] = full
    cls.apply_preset(full)
    try:
        with lycoris_logs(records):
            yield _PRIVATE_PRESET
    finally:
        config.PRESET.pop(_PRIVATE_PRESET, None)
        for attr, _ in _CLASS_ATTRS.values():
            if attr in saved:
                setattr(cls, attr, saved[attr])
            elif attr in cls.__dict__:
                delattr(cls, attr)
