"""Text-encoder output cache: ``cache_text_encoder_outputs`` (memory) and ``cache_text_encoder_outputs_to_disk``.

With the text encoders frozen (``network_train_unet_only``) and captions that never change during training (no
shuffling, dropout, tag dropout, token warm-up or wildcards; ``model_families.check_family_settings`` refuses the
rest), every caption is encoded once before training. The text encoders can then leave the GPU: for SDXL they are
about 1.6 GB in fp16.

The cache maps a processed caption to its conditioning rows (the family's ``encode_prompts`` output for that caption
alone, batch dimension 1, kept on the CPU in the dtype it was computed in), which is exactly what the training
loop's per-caption prompt cache holds, so the loop can take it as its prompt cache.

On disk (``<output_dir>/.te_cache/`` by default, never inside a dataset folder): one ``<key>.npz`` per caption with
the conditioning tensors as float32 and ``key``; ``key`` = sha256 of the caption, the family, the caller's settings
key (model, dtype) and the encoding settings (``clip_skip``, ``max_token_length``, ``weighted_captions``) plus a
format version. A file is reused only when its key matches and its values are finite; files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from contextlib import nullcontext
from typing import Any, Callable

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError

__all__ = ["CACHE_DIR_NAME", "CACHE_FORMAT", "TextEncoderOutputCache", "build_text_encoder_cache", "fixed_captions",
           "resolve_te_cache_dir", "te_cache_key", "wants_text_encoder_cache"]

CACHE_FORMAT = "lets-te-1"
CACHE_DIR_NAME = ".te_cache"


def wants_text_encoder_cache(config: TrainConfig) -> bool:
    """True when the settings ask for text-encoder output caching (in memory or on disk)."""
    return bool(config.cache_text_encoder_outputs
                or config.cache_text_encoder_outputs_to_disk)


def fixed_captions(plan) -> list[str]:
    """Every distinct caption the dataset ``plan`` trains with, as the dataset processes it (prefix, suffix,
    separators); only meaningful when no subset changes its captions during training."""
    from sd_scripts.data.captions import process_caption

    rng = random.Random(0)
    records = [*plan.images, *(getattr(plan, "validation_images", None) or [])]  # held-out images are validated
    captions = [process_caption(record.caption, plan.subsets[record.subset].captions, rng) for record in records]
    return list(dict.fromkeys(captions))


def resolve_te_cache_dir(config: TrainConfig, plan=None) -> str:
    """``<output_dir>/.te_cache``; refused (ConfigError) when it would be inside a dataset folder of ``plan``."""
    output_dir = config.output_dir
    if not output_dir:
        raise ConfigError("cache_text_encoder_outputs_to_disk: needs output_dir (the cache is kept in "
                          "<output_dir>/.te_cache); set output_dir", "cache_text_encoder_outputs_to_disk")
    folder = os.path.realpath(os.path.join(output_dir, CACHE_DIR_NAME))
    for subset in getattr(plan, "subsets", []) or []:
        root = os.path.realpath(subset.image_dir)
        if folder == root or folder.startswith(root.rstrip(os.sep) + os.sep):
            raise ConfigError(f"output_dir: the text-encoder cache '{folder}' would be inside the dataset folder "
                              f"'{root}'; choose an output_dir outside the dataset", "output_dir")
    return folder


def te_cache_key(caption: str, settings: dict) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "caption": caption, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TextEncoderOutputCache:
    """``{caption: {name: tensor [1, ...]}}`` for a model family's conditioning, optionally backed by a folder.

    ``settings`` identifies what shaped the outputs besides the caption (model path, dtype, clip_skip,
    max_token_length, weighted captions, family); ``folder`` None keeps the cache in memory only.
    """

    def __init__(self, settings: dict, folder: str | None = None):
        self.settings = dict(settings)
        self.folder = folder
        self.rows: dict[str, dict[str, Any]] = {}
        self.loaded_from_disk = 0
        self.encoded = 0

    # ------------------------------------------------------------------ disk
    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".npz")

    def _load(self, key: str) -> dict[str, Any] | None:
        import numpy as np
        import torch

        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                arrays = {name: np.array(data[name], dtype=np.float32) for name in data.files if name != "key"}
        except Exception:  # unreadable / partial / foreign file: encode again
            return None
        if not arrays or not all(np.isfinite(a).all() for a in arrays.values()):
            return None
        return {name: torch.from_numpy(a).unsqueeze(0) for name, a in arrays.items()}

    def _save(self, key: str, row: dict[str, Any]) -> None:
        import numpy as np

        from sd_scripts.files.atomic import atomic_write

        os.makedirs(self.folder, exist_ok=True)
        arrays = {name: value[0].detach().float().cpu().numpy() for name, value in row.items()}
        arrays["key"] = np.asarray(key)
        with atomic_write(self._path(key), "wb") as f:
            np.savez(f, **arrays)

    # ------------------------------------------------------------------ filling
    def fill(self, captions: list[str], encode: Callable[[list[str]], dict], batch_size: int = 1,
             context: Callable[[], Any] = nullcontext, progress: Callable[[int, int], None] | None = None) -> None:
        """Make sure every caption has rows: from the folder when valid, else ``encode(captions) -> cond`` in
        batches (under ``torch.no_grad()`` and ``context()``, e.g. the accelerator's autocast)."""
        import torch

        todo: list[tuple[str, str]] = []
        for caption in dict.fromkeys(captions):
            if caption in self.rows:
                continue
            key = te_cache_key(caption, self.settings)
            row = self._load(key) if self.folder else None
            if row is not None:
                self.rows[caption] = row
                self.loaded_from_disk += 1
            else:
                todo.append((caption, key))
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start : start + max(1, batch_size)]
            with torch.no_grad(), context():
                cond = encode([caption for caption, _ in chunk])
            for i, (caption, key) in enumerate(chunk):
                row = {name: value[i : i + 1].detach().cpu() for name, value in cond.items()}
                self.rows[caption] = row
                if self.folder:
                    self._save(key, row)
            self.encoded += len(chunk)
            if progress is not None:
                progress(start + len(chunk), len(todo))

    # ------------------------------------------------------------------ reading
    def __contains__(self, caption: str) -> bool:
        return caption in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, captions: list[str], device=None) -> dict:
        """The conditioning of a batch of captions (rows stacked; on ``device`` when given)."""
        import torch

        rows = [self.rows[c] for c in captions]
        return {name: torch.cat([r[name] for r in rows]).to(device) if device is not None else
                torch.cat([r[name] for r in rows]) for name in rows[0]}


def build_text_encoder_cache(config: TrainConfig, plan, model, *, settings_key: str = "", batch_size: int = 1,
                             context: Callable[[], Any] = nullcontext,
                             progress: Callable[[int, int], None] | None = None) -> TextEncoderOutputCache:
    """The filled cache for every caption of ``plan`` (a ``DatasetPlan``) with ``model`` (a ``LoadedModel``).

    ``settings_key`` names the model and dtype (like the latent cache's VAE key); the disk folder is used when
    ``cache_text_encoder_outputs_to_disk`` is on. ``batch_size`` 1 encodes each caption alone, as the training
    loop's prompt cache does, so cached and uncached runs give the same numbers.
    """
    family = model.family
    settings = {"family": family.name, "model": settings_key, "clip_skip": config.clip_skip,
                "max_token_length": config.max_token_length, "weighted": bool(config.weighted_captions),
                **family.training_options(config)}  # FLUX.1: the T5 length and mask shape the outputs
    folder = resolve_te_cache_dir(config, plan) if config.cache_text_encoder_outputs_to_disk else None
    cache = TextEncoderOutputCache(settings, folder)

    def encode(captions: list[str]) -> dict:
        return family.encode_prompts(model, captions, config.clip_skip, config.max_token_length,
                                     config.weighted_captions)

    cache.fill(fixed_captions(plan), encode, batch_size=batch_size, context=context, progress=progress)
    return cache

