"""File I/O shared by the LoRA tools: output-path checks, LoRA loading with the tool's setting name,
and single-file checkpoints written atomically with their metadata and dtypes kept."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from sd_scripts.core.errors import ConfigError

__all__ = ["check_output_path", "is_safetensors", "load_network", "lora_format_of", "read_checkpoint_header",
           "read_checkpoint_pair", "read_sd_checkpoint", "save_sd_checkpoint"]

_LORA_EXTS = {".safetensors": "safetensors", ".ckpt": "ckpt", ".pt": "pt", ".pth": "pt"}
_CKPT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth")


def check_output_path(path, setting: str = "save_to", overwrite: bool = False, exts=tuple(_LORA_EXTS)) -> Path:
    """Refuse an output that exists (unless ``overwrite``), is a folder, or has an unknown extension."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"{setting}: no output file given; add --{setting} OUT.safetensors", setting=setting)
    p = Path(path)
    if p.suffix.lower() not in exts:
        raise ConfigError(f"{setting}: {p} must end in {', '.join(exts)}", setting=setting)
    if p.is_dir():
        raise ConfigError(f"{setting}: {p} is a folder; give a file name", setting=setting)
    if p.exists() and not overwrite:
        raise ConfigError(f"{setting}: {p} already exists; choose another name or add --overwrite", setting=setting)
    return p


def lora_format_of(path) -> str:
    return _LORA_EXTS.get(Path(path).suffix.lower(), "safetensors")


def load_network(path, setting: str, with_base: bool = False):
    """``(modules, metadata)`` of a LoRA/LyCORIS file; ConfigError naming ``setting`` when it is not one.
    ``with_base``: the caller merges into base weights, so DoRA/GLoRA/OFT modules are taken (``parse_network``)."""
    from sd_scripts.files.lora_file import load_lora_file
    from sd_scripts.networks.network_state import parse_network

    sd, md = load_lora_file(path, setting=setting)
    return parse_network(sd, source=f"{setting}: {path}", metadata=md, with_base=with_base), md


def _require_file(path, setting: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{setting}: {p} does not exist or is not a file; give a single-file .safetensors/.ckpt checkpoint",
                          setting=setting)
    return p


def _family_of(shapes, path, setting: str) -> str:
    from sd_scripts.networks.checkpoint_map import checkpoint_kind

    family = checkpoint_kind(shapes)
    if family is None:
        raise ConfigError(f"{setting}: {path} is not an SD1/SD2/SDXL or FLUX.1 single-file checkpoint (no "
                          "model.diffusion_model.* with cond_stage_model.* / conditioner.embedders.* weights, no "
                          "double_blocks.*/single_blocks.*; is it a LoRA or a diffusers file?)", setting=setting)
    return family


def read_sd_checkpoint(path, setting: str):
    """``(state_dict, metadata, family)`` of a single-file SD1/SD2/SDXL or FLUX.1 checkpoint (family ``"sd1"``,
    ``"sd2"``, ``"sdxl"`` or ``"flux"``, from the keys); ConfigError/ModelLoadError if not one."""
    from sd_scripts.models.loading import read_checkpoint

    p = _require_file(path, setting)
    state, metadata = read_checkpoint(str(p), setting)
    return state, metadata, _family_of(state, p, setting)


def read_checkpoint_header(path, setting: str):
    """``(shapes, metadata, family)`` of a single-file checkpoint from its .safetensors header (no tensor read)."""
    from sd_scripts.models.loading import read_checkpoint_shapes

    p = _require_file(path, setting)
    shapes, metadata, _ = read_checkpoint_shapes(str(p), setting)
    return shapes, metadata, _family_of(shapes, p, setting)


def is_safetensors(path) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


_FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "FLUX.1"}


def read_checkpoint_pair(base, tuned, base_setting: str = "base", tuned_setting: str = "tuned"):
    """``(base_state, tuned_state, family)`` of two checkpoints of the same family. A .safetensors file is read
    lazily (:class:`~sd_scripts.files.safetensors_stream.LazyStateDict`: one tensor at a time, so two 12B FLUX.1
    transformers never sit in memory); other formats are read whole."""

    def read(path, setting):
        if is_safetensors(path):
            from sd_scripts.files.safetensors_stream import LazyStateDict

            _, _, family = read_checkpoint_header(path, setting)
            return LazyStateDict(path), family
        state, _, family = read_sd_checkpoint(path, setting)
        return state, family

    base_sd, family = read(base, base_setting)
    tuned_sd, tuned_family = read(tuned, tuned_setting)
    if tuned_family != family:
        raise ConfigError(f"{tuned_setting}: {tuned} is an {_FAMILY_NAMES[tuned_family]} checkpoint but {base} is "
                          f"{_FAMILY_NAMES[family]}; extract between two versions of the same model", setting=tuned_setting)
    return base_sd, tuned_sd, family


def _unshare(state: Mapping) -> dict:
    """safetensors refuses tensors that share memory (common in .ckpt files): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[key] = t
    return out


def save_sd_checkpoint(path, state: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a single-file checkpoint atomically: ``.safetensors`` (with string metadata) or a ``.ckpt``
    pickle ``{"state_dict": ...}``. The file appears only once it is complete."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            save_file(_unshare(state), str(tmp), metadata=meta or None)
        else:
            torch.save({"state_dict": dict(state)}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
