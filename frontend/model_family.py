"""The base model's family, told cheaply, and the resolution defaults sized for it.

``ArgsList.py``'s resolution defaults (512 px, buckets 320-960) are sized for SD 1.x/2.x. A family whose
own default resolution differs (SDXL: 1024 px, buckets 512-2048, from ``ModelFamily.default_settings``)
gets its sizes instead, for each of those settings the user left at the SD value and did not set in a
JSON file or on the command line; :func:`apply_family_defaults` says so in one line.

The family comes from the settings (``sdxl``, ``v2``) or from the model files without loading them
(:func:`cheap_family`: a ``.safetensors`` header or a diffusers folder's configs, never torch). A
``.ckpt`` (it must be unpickled) or a Hugging Face id (it may have to be downloaded) is not looked at
here: set ``sdxl`` for those, or the engine tells the family when training starts.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["SD_SIZES", "cheap_family", "model_family_of", "family_sizes", "apply_family_defaults",
           "resize_for_family"]

# ArgsList.py's shipped resolution defaults: what "left at the SD default" means.
SD_SIZES = {"train_resolution": 512, "min_bucket_resolution": 320, "max_bucket_resolution": 960}
_SIZE_ORDER = ("train_resolution", "min_bucket_resolution", "max_bucket_resolution")
_SAFETENSORS = (".safetensors", ".sft")


def cheap_family(base_model: str | None) -> str | None:
    """The family name of a local ``.safetensors`` file or diffusers folder, read without torch; else None."""
    if not base_model or not isinstance(base_model, str):
        return None
    path = os.path.expanduser(base_model)
    if not (os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(_SAFETENSORS))):
        return None
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.core.errors import UserError
    from sd_scripts.models.loading import detect_family

    probe = TrainConfig(pretrained_model_name_or_path=path, model_family=None, sdxl=None, v2=None,
                        v_parameterization=None)
    try:
        family, _ = detect_family(probe)
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None  # not a model we can read: validation and preflight say why
    return family.name


def model_family_of(store: Any) -> tuple[str | None, str]:
    """``(family name or None, where it comes from)`` for an ArgStore."""
    if getattr(store, "sdxl", False):
        return "sdxl", "sdxl is set"
    if getattr(store, "v2", False):
        return "sd2", "v2 is set"
    name = cheap_family(getattr(store, "base_model", None))
    if name is None:
        return None, ""
    return name, f"detected from {os.path.basename(os.path.normpath(store.base_model))}"


def family_sizes(family: str | None) -> dict[str, int]:
    """ArgStore resolution settings sized for ``family``; {} for a family the SD sizes fit (or unknown)."""
    if not family:
        return {}
    from sd_scripts.models.families import FAMILIES

    fam = FAMILIES.get(family)
    if fam is None:
        return {}
    sized = fam.default_settings()
    resolution = int(str(sized["resolution"]).split(",")[0])
    if resolution == SD_SIZES["train_resolution"]:
        return {}
    return {"train_resolution": resolution, "min_bucket_resolution": int(sized["min_bucket_reso"]),
            "max_bucket_resolution": int(sized["max_bucket_reso"])}


def resize_for_family(store: Any, family: str | None, fixed: frozenset[str] | set[str] = frozenset(),
                      previous: str | None = None) -> dict[str, int]:
    """The changes that size ``store`` for ``family``: settings at the SD value (or at the sizes of ``previous``, the
    family the store was sized for: the wizard switching SDXL back to SD) and not in ``fixed`` take the family's value.

    A change that would leave the training resolution outside the bucket range is left out, and a
    non-square resolution (``height_resolution`` set) is the user's own choice and left alone.
    """
    target = family_sizes(family) or dict(SD_SIZES)
    sources = [dict(SD_SIZES)] + ([family_sizes(previous)] if family_sizes(previous) else [])
    changes: dict[str, int] = {}
    for name in _SIZE_ORDER:
        value = getattr(store, name)
        if name in fixed or value == target[name] or not any(value == src[name] for src in sources):
            continue
        if name == "train_resolution" and getattr(store, "height_resolution", None) is not None:
            continue
        changes[name] = target[name]

    def final(name: str) -> int:
        return changes.get(name, getattr(store, name))

    side = final("train_resolution")
    if "train_resolution" in changes and not final("min_bucket_resolution") <= side <= final("max_bucket_resolution"):
        changes.pop("train_resolution")
        side = final("train_resolution")
    for name in ("min_bucket_resolution", "max_bucket_resolution"):
        if name in changes and not final("min_bucket_resolution") <= side <= final("max_bucket_resolution"):
            changes.pop(name)
    return changes


def _unused_defaults(store: Any, family: str | None, fixed) -> dict[str, Any]:
    """ArgStore defaults the family does not use (FLUX.1: clip_skip, max_clip_token_length) set to the family's
    neutral value when the user left them at ArgsList.py's value and did not set them in a JSON file or on the
    command line."""
    if not family:
        return {}
    from sd_scripts.models.families import FAMILIES

    from .settings_map import NAME_MAP

    fam = FAMILIES.get(family)
    unused = dict(getattr(fam, "unused_settings", {}) or {})
    if not unused:
        return {}
    defaults = type(store)()
    return {name: unused[NAME_MAP.get(name, name)] for name in type(store).setting_names()
            if NAME_MAP.get(name, name) in unused and name not in fixed
            and getattr(store, name) == getattr(defaults, name) != unused[NAME_MAP.get(name, name)]}


def apply_family_defaults(store: Any, fixed: frozenset[str] | set[str] = frozenset()) -> tuple[Any, str | None]:
    """Size the resolution settings for the base model's family; return the store and one line saying so.

    ``fixed`` names the settings the user set (in a JSON file or on the command line): they are never
    changed. Only families the SD sizes do not fit (SDXL) change anything.
    """
    family, source = model_family_of(store)
    changes = resize_for_family(store, family, fixed) if family_sizes(family) else {}
    changes.update(_unused_defaults(store, family, fixed))
    if not changes:
        return store, None
    shown = ", ".join(f"{name} {getattr(store, name)} -> {value}" for name, value in changes.items())
    note = (f"note: the base model is {family.upper()} ({source}), so its defaults are used: {shown} "
            "(set them yourself to train at other sizes)")
    return store.replace(**changes), note
