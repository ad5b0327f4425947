"""CLIP tokenizers found offline: the diffusers folder's ``tokenizer/`` (``tokenizer_2/``), ``tokenizer_cache_dir``
(the folder itself or kohya's ``<dir>/<repo id with "/" -> "_">``), the Hugging Face cache, and only then (not
offline) a download, saved into ``tokenizer_cache_dir`` when given."""

from __future__ import annotations

import os
from pathlib import Path

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ModelLoadError
from sd_scripts.models.checkpoint_io import SETTING, hf_cache_dir as _hf_cache_dir, load_error as _fail, offline as _offline

__all__ = ["has_tokenizer_files", "hub_tokenizer_folder", "load_tokenizer"]


def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def _tokenizer_from_folder(folder: Path, setting: str):
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise _fail(setting, f"the tokenizer in {folder} cannot be read ({type(e).__name__}); fix or remove it")
    # transformers 5 builds an empty tokenizer from a folder without vocabulary files instead of failing
    if len(tokenizer) < 10 or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise _fail(setting, f"{folder} holds no usable CLIP tokenizer (vocab.json + merges.txt or tokenizer.json); "
                             "fix or remove it")
    return tokenizer


def _hub_tokenizer_folder(source, local_only: bool) -> Path | None:
    """The tokenizer folder of ``source`` in the Hugging Face cache (downloaded first unless ``local_only``)."""
    from huggingface_hub import snapshot_download

    prefix = f"{source.subfolder}/" if source.subfolder else ""
    patterns = [prefix + n for n in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json")]
    snapshot = Path(snapshot_download(source.repo_id, allow_patterns=patterns, cache_dir=_hf_cache_dir(),
                                      local_files_only=local_only))
    folder = snapshot / source.subfolder if source.subfolder else snapshot
    return folder if _has_tokenizer_files(folder) else None


def load_tokenizer(family, config: TrainConfig | None = None, model_folder: str | os.PathLike | None = None, index: int = 0,
                   download: bool = True):
    """The CLIP tokenizer of ``family`` (text encoder ``index``); see the module doc for the lookup order.
    ``download=False``: never download (ModelLoadError when none is found locally)."""
    tokenizer = _find_tokenizer(family, config, model_folder, index, download)
    pad = family.tokenizer_sources[index].pad_token
    if pad is not None and tokenizer.pad_token != pad:
        tokenizer.pad_token = pad
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.unk_token_id:
            raise ModelLoadError(f"tokenizer_cache_dir: the {family.name} tokenizer {index + 1} has no {pad!r} token to "
                                 "pad with; give the right tokenizer", "tokenizer_cache_dir")
    return tokenizer


def _find_tokenizer(family, config, model_folder, index: int, download: bool = True):
    source = family.tokenizer_sources[index]
    if model_folder is not None:
        sub = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
        if _has_tokenizer_files(Path(model_folder) / sub):
            return _tokenizer_from_folder(Path(model_folder) / sub, SETTING)
    cache_dir = config.tokenizer_cache_dir if config is not None else None
    if cache_dir:
        base = Path(os.path.expanduser(str(cache_dir)))
        for candidate in (base / source.cache_name, base / source.cache_name / "tokenizer", base):
            if _has_tokenizer_files(candidate):
                return _tokenizer_from_folder(candidate, "tokenizer_cache_dir")
    try:
        folder = _hub_tokenizer_folder(source, local_only=True)
    except Exception:  # noqa: BLE001 - not in the cache
        folder = None
    if folder is not None:
        return _tokenizer_from_folder(folder, "tokenizer_cache_dir")
    hint = (f"set tokenizer_cache_dir to a folder holding the {source.repo_id} tokenizer "
            f"(the folder itself or <dir>/{source.cache_name})")
    if _offline() or not download:
        raise ModelLoadError(f"tokenizer_cache_dir: no {family.name} CLIP tokenizer found offline; {hint}",
                             "tokenizer_cache_dir")
    try:
        folder = _hub_tokenizer_folder(source, local_only=False)
        if folder is None:
            raise FileNotFoundError(source.repo_id)
    except Exception as e:  # noqa: BLE001 - network problems
        raise ModelLoadError(f"tokenizer_cache_dir: the {family.name} CLIP tokenizer could not be downloaded "
                             f"({type(e).__name__}); {hint}", "tokenizer_cache_dir")
    tokenizer = _tokenizer_from_folder(folder, "tokenizer_cache_dir")
    if cache_dir:
        try:
            tokenizer.save_pretrained(str(Path(os.path.expanduser(str(cache_dir))) / source.cache_name))
        except OSError:
            pass  # a read-only cache folder only costs a download next time
    return tokenizer


has_tokenizer_files = _has_tokenizer_files
hub_tokenizer_folder = _hub_tokenizer_folder
