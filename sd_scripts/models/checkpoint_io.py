"""Reading model files and building modules from their weights: the primitives every model family's loader uses.

Single files: ``.safetensors`` (header read without the tensors; mmap or one sequential read) and ``.ckpt``/``.pt``
pickles loaded with ``weights_only=True`` (a pickle that would run code is refused in one line). ``build_module``
creates a module on the meta device and assigns the (cast) weights, so a part costs one copy of its weights.
``LoadedModel`` is what loading returns, for every family.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_scripts.core.errors import ModelLoadError

__all__ = ["LoadedModel", "PICKLE_EXTS", "SAFETENSORS_EXTS", "SETTING", "build_module", "fit_state", "hf_cache_dir",
           "is_safetensors", "load_error", "offline", "read_checkpoint", "read_checkpoint_shapes",
           "read_safetensors_header", "read_safetensors_streamed"]

SETTING = "pretrained_model_name_or_path"
SAFETENSORS_EXTS = (".safetensors", ".sft")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class LoadedModel:
    """The parts of a loaded base model, ready for training (float32 on the CPU unless asked otherwise)."""

    family: Any  # the ModelFamily
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    v_parameterization: bool
    model_path: str
    info: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # training-time settings the family's calls read (FLUX: guidance)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoder_2(self):
        return self.text_encoders[1] if len(self.text_encoders) > 1 else None


# ------------------------------------------------------------------------------------------------- file reading


def _fail(setting: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"{setting}: {message}", setting)


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_EXTS)


def _read_safetensors_header(path: str, setting: str) -> tuple[dict, dict]:
    """``({key: shape}, metadata)`` from a safetensors header, without reading the tensors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise _fail(setting, f"{path} is not a readable .safetensors file ({e}); check the file or download it again")
    metadata = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}, metadata


def _unsafe_globals(path: str) -> list[str]:
    """The code a pickle would import (empty when it cannot be listed: then the file is just unreadable)."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint

        return list(get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to word the message
        return []


def _torch_load(path: str, setting: str) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that needs to run code is refused."""
    import pickle

    import torch

    def unreadable(e: Exception) -> ModelLoadError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return _fail(setting, f"{path} is not a readable checkpoint ({first}); check the file or download it again")

    try:
        with warnings.catch_warnings():
            # a plain (non-torch) pickle makes torch warn about its protocol before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if not names:  # the legacy (pre-zip) format cannot be listed; torch names the first global it met
            names = re.findall(r"unsupported GLOBAL (\S+)", str(e))
        if not names:
            raise unreadable(ValueError("not a PyTorch checkpoint"))
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise _fail(setting, f"{path} was refused: loading it would run code stored in the pickle ({shown}); "
                             "use a .safetensors version of the model")
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise unreadable(e)


def _unwrap_state_dict(obj: Any, path: str, setting: str) -> dict:
    import torch

    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _fail(setting, f"{path} holds no state dict; give a Stable Diffusion checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_checkpoint(path: str, setting: str = SETTING, mmap: bool = True, streamed: bool = False) -> tuple[dict, dict]:
    """``(state_dict, safetensors metadata)`` of a single-file checkpoint (pickles loaded with weights_only).

    ``mmap=False`` reads a .safetensors file into memory with one sequential read (kohya's
    ``disable_mmap_load_safetensors``) instead of paging it in tensor by tensor. ``streamed`` reads it in file order
    into one buffer per tensor (:func:`read_safetensors_streamed`): for callers that cast and drop each part's
    tensors, the peak memory is then about the built model, not the model plus the file."""
    if _is_safetensors(path):
        _, metadata = _read_safetensors_header(path, setting)  # a clear error for a broken file
        from safetensors import safe_open

        try:
            if streamed:
                return read_safetensors_streamed(path), metadata
            if not mmap:
                from safetensors.torch import load

                return load(Path(path).read_bytes()), metadata
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise _fail(setting, f"{path} is not a readable .safetensors file ({e}); check the file")
    if path.lower().endswith(PICKLE_EXTS):
        return _unwrap_state_dict(_torch_load(path, setting), path, setting), {}
    raise _fail(setting, f"{path} has an unknown extension; use a .safetensors or .ckpt file, or a diffusers folder")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_safetensors_streamed(path: str) -> dict:
    """Every tensor of a .safetensors file, each read into a buffer of its own, in file order. A memory-mapped file
    keeps every page it has read resident (and counted in the process's memory) until the last tensor viewing it is
    gone, so a loader that casts part after part would hold the whole file beside the model; here each source
    tensor's memory is freed as soon as its cast copy exists."""
    import torch

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        start = 8 + length
        out = {}
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            if f.readinto(buffer) != end - begin:
                raise ValueError(f"the data of {key} is cut short")
            shape = list(entry["shape"])
            out[key] = (torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)).reshape(shape)
    return {key: out[key] for key in header}  # the file's key order


def read_checkpoint_shapes(path: str, setting: str = SETTING) -> tuple[dict, dict, dict | None]:
    """``({key: shape}, metadata, state_dict or None)``: safetensors from the header only; pickles must be loaded."""
    if _is_safetensors(path):
        shapes, metadata = _read_safetensors_header(path, setting)
        return shapes, metadata, None
    state, metadata = read_checkpoint(path, setting)
    return {k: tuple(v.shape) for k, v in state.items()}, metadata, state


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))


def _hf_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None



def _fit_state(model, state: dict, setting: str, where: str, what: str, fix: str, dtype) -> dict:
    """Check keys and shapes against ``model`` (1x1 conv <-> linear reshaped) and cast floats to ``dtype`` (a dtype,
    or a function of the key giving one: float8 storage of some weights).

    Empties ``state`` while it builds the result, so a caller holding no other reference to the source tensors
    keeps one copy of each weight at a time, not two."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise _fail(setting, f"{where}: the {what} weights do not match ({'; '.join(detail)}); {fix}")
    out = {}
    for key, target in expected.items():
        value = state.pop(key)  # the source tensor is freed as soon as its cast copy exists (peak memory)
        if tuple(value.shape) != tuple(target.shape):
            if value.numel() == target.numel() and value.squeeze().shape == target.squeeze().shape:
                value = value.reshape(target.shape)
            else:
                raise _fail(setting, f"{where}: {what} weight {key} has shape {tuple(value.shape)}, the model expects "
                                     f"{tuple(target.shape)}; {fix}")
        wanted = dtype(key) if callable(dtype) else dtype
        if value.is_floating_point() and wanted is not None:
            value = value.to(wanted)
        out[key] = value
    return out


def _build_module(factory, state: dict, setting: str, where: str, what: str, fix: str, dtype):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    model.load_state_dict(_fit_state(model, state, setting, where, what, fix, dtype), strict=True, assign=True)
    return model.eval()


load_error = _fail
is_safetensors = _is_safetensors
read_safetensors_header = _read_safetensors_header
offline = _offline
hf_cache_dir = _hf_cache_dir
fit_state = _fit_state
build_module = _build_module
