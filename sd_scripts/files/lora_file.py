"""Reading and writing kohya LoRA files, their hashes and modelspec metadata.

* ``safetensors`` (default): tensors plus string metadata (``ss_*``, ``modelspec.*``) and the
  ``sshs_model_hash`` / ``sshs_legacy_hash`` that sd-webui-additional-networks and A1111 use.
* ``ckpt`` / ``pt``: ``torch.save`` of the state dict, no metadata (as kohya).

Files are written atomically (:mod:`sd_scripts.files.atomic`) and checked after writing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_scripts.files.atomic import atomic_save_bytes, atomic_write
from sd_scripts.core.errors import ConfigError

__all__ = [
    "LORA_FORMATS", "MODELSPEC_VERSION", "precision_dtype", "save_lora_file", "load_lora_file",
    "read_safetensors_metadata", "safetensors_hashes", "legacy_model_hash", "file_sha256", "build_modelspec",
]

LORA_FORMATS = ("safetensors", "ckpt", "pt")
MODELSPEC_VERSION = "1.0.1"
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_CHUNK = 1024 * 1024

_PRECISIONS = {
    "float": "float32", "fp32": "float32", "float32": "float32", "full": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
_NO_PRECISION = ("", "none", "no")


def precision_dtype(name: Any, setting: str = "save_precision"):
    """``"float"|"fp32"`` -> float32, ``"fp16"`` -> float16, ``"bf16"`` -> bfloat16, None/"no" -> None.
    A ``torch.dtype`` passes through; anything else raises ConfigError naming ``setting``."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key in _NO_PRECISION:
        return None
    if key not in _PRECISIONS:
        raise ConfigError(f"{setting}: {name!r} is not a precision; use float, fp16 or bf16", setting=setting)
    return getattr(torch, _PRECISIONS[key])


# --------------------------------------------------------------------------- hashes

def _addnet_hashes(blob: bytes) -> tuple[str, str]:
    header_len = struct.unpack("<Q", blob[:8])[0]
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(blob)[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def safetensors_hashes(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """kohya's ``precalculate_safetensors_hashes``: ``(sshs_model_hash, sshs_legacy_hash)`` of the
    safetensors serialization of ``state_dict`` with only the ``ss_*`` metadata.
    ``sshs_model_hash`` is the sha256 of the tensor data section; ``sshs_legacy_hash`` the first
    8 hex digits of the sha256 of bytes 0x100000..0x110000 of that serialization."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    return _addnet_hashes(save(dict(state_dict), ss_only))


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash: sha256 of bytes 0x100000..0x110000 of the file, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the whole file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- save

def _normalise_format(fmt: str) -> str:
    key = str(fmt).strip().lower().lstrip(".")
    if key not in LORA_FORMATS:
        raise ConfigError(f"save_model_as: {fmt!r} is not a LoRA file format; use safetensors, ckpt or pt",
                          setting="save_model_as")
    return key


def _prepare_tensors(state_dict: Mapping[str, Any], save_dtype) -> dict[str, Any]:
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict value {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if save_dtype is not None and (t.is_floating_point() or key.endswith(".alpha")):  # IA3 on_input stays an integer
            t = t.to(save_dtype)
        out[key] = t.to("cpu").contiguous().clone()
    return out


def _check_written_safetensors(path: Path, keys: set[str], metadata: Mapping[str, str], size: int) -> None:
    header, file_meta = _read_header(path)
    names = set(header) - {"__metadata__"}
    if names != keys or dict(file_meta) != dict(metadata) or path.stat().st_size != size:
        raise OSError(f"{path}: the file read back differs from what was written (disk full or failing?)")


def save_lora_file(path: str | os.PathLike, state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                   save_dtype=None, fmt: str = "safetensors") -> dict[str, str] | None:
    """Write a LoRA state dict atomically.

    Every tensor (alpha included) is cast to ``save_dtype`` (a torch dtype, a precision name or
    None to keep), moved to CPU and made contiguous. For safetensors, metadata values are
    stored as strings and ``sshs_model_hash`` / ``sshs_legacy_hash`` are added (computed after
    casting, as kohya); the metadata written is returned. ``ckpt``/``pt`` carry no metadata
    (returns None)."""
    fmt = _normalise_format(fmt)
    save_dtype = precision_dtype(save_dtype)
    tensors = _prepare_tensors(state_dict, save_dtype)
    path = Path(path)
    if fmt != "safetensors":
        import torch

        with atomic_write(path, "wb") as f:
            torch.save(tensors, f)
        return None

    from safetensors.torch import save

    meta = {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    blob = save(tensors, meta)
    atomic_save_bytes(path, blob)
    _check_written_safetensors(path, set(tensors), meta, len(blob))
    return meta


# --------------------------------------------------------------------------- load

def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON header of a safetensors file and its ``__metadata__``; ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file too short")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > 100 * 1024 * 1024:
            raise ValueError("bad header length")
        raw = f.read(n)
    if len(raw) != n or not raw.lstrip().startswith(b"{"):
        raise ValueError("bad header")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("bad header")
    return header, header.get("__metadata__") or {}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (reads the header only; {} if it has none)."""
    try:
        return dict(_read_header(Path(path))[1])
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from err


def load_lora_file(path: str | os.PathLike, setting: str = "network_weights") -> tuple[dict[str, Any], dict[str, str]]:
    """Read a kohya LoRA file (safetensors, or ckpt/pt via ``torch.load(weights_only=True)``).

    Returns ``(state_dict, metadata)`` (metadata is {} for torch files). A missing, unreadable or
    non-LoRA file raises ConfigError naming ``setting``."""
    import torch

    from sd_scripts.files.lora_keys import group_by_module

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}: {path} does not exist or is not a file; give the path of a LoRA file",
                          setting=setting)
    metadata: dict[str, str] = {}
    try:
        try:
            _, metadata = _read_header(path)
            is_safetensors = True
        except (ValueError, UnicodeDecodeError):
            is_safetensors = False
        if is_safetensors:
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any decoding failure means "not a readable LoRA file"
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{setting}: {path} could not be read as a LoRA file ({type(err).__name__}: {reason}); "
                          "give a .safetensors, .ckpt or .pt LoRA file", setting=setting) from err
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError(f"{setting}: {path} does not hold a flat dict of tensors, so it is not a LoRA file",
                          setting=setting)
    parsed = group_by_module(state_dict)
    if not parsed.modules:
        raise ConfigError(f"{setting}: {path} has no lora_unet_/lora_te_ keys, so it is not a kohya LoRA file "
                          "(a full model or a diffusers-format LoRA?)", setting=setting)
    return dict(state_dict), dict(metadata)


# --------------------------------------------------------------------------- modelspec

def _resolution_text(resolution: Any) -> str:
    if isinstance(resolution, str):
        parts = [p for p in resolution.replace("x", ",").split(",") if p.strip()]
        values = [int(p) for p in parts]
    elif isinstance(resolution, (int, float)):
        values = [int(resolution)]
    else:
        values = [int(v) for v in resolution]
    if len(values) == 1:
        values = values * 2
    return f"{values[0]}x{values[1]}"


def _date_text(date: Any) -> str:
    if date is None:
        date = time.time()
    if isinstance(date, str):
        return date
    if isinstance(date, (int, float)):
        date = _dt.datetime.fromtimestamp(date)
    return date.replace(microsecond=0, tzinfo=None).isoformat()


def build_modelspec(family_arch: str, title: str | None, resolution: Any, prediction_type: str = "epsilon",
                    clip_skip: int | None = None, date: Any = None, *, implementation: str | None = None,
                    implementation_version: str | None = None, timestep_range: tuple[int, int] | None = None,
                    extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """SAI ModelSpec keys as kohya writes them for a LoRA.

    ``family_arch`` is the architecture id (``"stable-diffusion-v1"``; ``"/lora"`` is appended when
    no adapter suffix is given). ``resolution`` is an int, ``(width, height)`` or ``"512,768"``;
    ``prediction_type`` ``"epsilon"`` or ``"v"``; ``date`` a datetime, unix time or None (now),
    written as ISO 8601 local time in seconds. ``extra`` adds ``modelspec.<key>`` entries
    (author, description, license, tags, ...); None values are skipped."""
    arch = family_arch if "/" in family_arch else f"{family_arch}/lora"
    if implementation is None:
        implementation = SDXL_IMPLEMENTATION if arch.startswith("stable-diffusion-xl") else "diffusers"
    pred = None if prediction_type is None else str(prediction_type).lower()
    if pred is not None:
        pred = "v" if pred in ("v", "v_prediction", "v-prediction") else "epsilon"
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": implementation,
        "modelspec.title": title if title else f"LoRA@{int(time.time())}",
        "modelspec.resolution": _resolution_text(resolution),
        "modelspec.date": _date_text(date),
    }
    if pred is not None:
        spec["modelspec.prediction_type"] = pred
    if timestep_range is not None:
        spec["modelspec.timestep_range"] = f"{int(timestep_range[0])},{int(timestep_range[1])}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(int(clip_skip))
    if implementation_version:
        spec["modelspec.implementation_version"] = implementation_version
    for key, value in (extra or {}).items():
        if value is not None:
            spec[key if key.startswith("modelspec.") else f"modelspec.{key}"] = str(value)
    return spec
