"""On-disk latent cache, keyed by image content and the settings that shaped the latents.

Where: ``<output_dir>/.latent_cache/`` (or ``config.latent_cache_dir`` when a front end sets
one). Never inside a dataset folder: the user's dataset is not written to, and a cache folder that
would land inside one is refused with a ``ConfigError``.

What: one ``<key>.npz`` per image and bucket placement, ``key = sha256`` of

* the sha256 of the image file's bytes (not its name or modification time),
* the bucket size, the resized size, the crop offset and the resize interpolation,
* the caller's ``settings_key`` (the VAE's identity: model/VAE file hash, dtype, ...),
* ``alpha_mask: true`` when the image's subset uses its alpha channel as a loss mask (absent
  otherwise, so caches written without masks keep their keys and are never taken for masked ones),
* a format version.

The file holds ``latents`` (float32 ``[C, h, w]``, unscaled), ``latents_flipped`` when flip
augmentation was on, ``original_size`` ``[W, H]``, ``crop_ltrb`` and ``key``. A file is reused only
when its key, shapes and values (finite) check out, and when ``latents_flipped`` is present if
flips are needed; with ``alpha_mask`` it also holds ``alpha_mask`` (float32 ``[H, W]`` in 0..1, at
image resolution and unflipped, kohya's npz key), required when masks are needed. Otherwise a file
is recomputed and replaced. Files are written atomically (a
temporary name in the same folder, then ``os.replace``). Stale files of older settings are left
in place; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from sd_scripts.core.config import TrainConfig
from sd_scripts.files.atomic import atomic_write
from sd_scripts.core.errors import ConfigError

__all__ = ["CACHE_FORMAT", "CACHE_DIR_NAME", "resolve_cache_dir", "file_digest", "cache_key", "DiskLatentCache"]

CACHE_FORMAT = "lets-latents-1"
CACHE_DIR_NAME = ".latent_cache"


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def latent_cache_dir(config: TrainConfig) -> str | None:
    """The ``latent_cache_dir`` a front end set on the config (no declared setting: ``TrainConfig`` does not have it
    unless a caller adds it, so it is read with getattr); None for ``<output_dir>/.latent_cache``."""
    return getattr(config, "latent_cache_dir", None)


def resolve_cache_dir(config: TrainConfig, plan: Any = None) -> str:
    """The latent cache folder for ``config``; refuses one inside the dataset folders of ``plan``."""
    folder = latent_cache_dir(config)
    setting = "latent_cache_dir"
    if not folder:
        output_dir = config.output_dir
        if not output_dir:
            raise ConfigError(
                "cache_latents_to_disk: needs output_dir (the cache is kept in <output_dir>/.latent_cache); set output_dir",
                "cache_latents_to_disk",
            )
        folder = os.path.join(output_dir, CACHE_DIR_NAME)
        setting = "output_dir"
    if plan is not None:
        roots = list(getattr(plan, "roots", []) or []) + [s.image_dir for s in getattr(plan, "subsets", [])]
        for root in roots:
            if _inside(folder, root):
                raise ConfigError(
                    f"{setting}: the latent cache '{folder}' would be inside the dataset folder '{root}'; "
                    f"choose an {setting} outside the dataset",
                    setting,
                )
    return folder


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def cache_key(content_digest: str, settings: dict) -> str:
    """The cache key of one image: its content digest plus the settings that shaped its latents."""
    payload = json.dumps({"format": CACHE_FORMAT, "content": content_digest, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class DiskLatentCache:
    """A folder of ``<key>.npz`` latent files (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder

    def path_for(self, key: str) -> str:
        return os.path.join(self.folder, key + ".npz")

    def load(
        self, key: str, spatial: tuple[int, int], need_flipped: bool, mask_hw: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        """``(latents, latents_flipped or None, alpha_mask or None)`` when a valid file exists, else ``None``.

        ``spatial`` is the expected latent ``(h, w)``; ``mask_hw`` the image ``(H, W)`` when an alpha
        mask is needed.
        """
        path = self.path_for(key)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                latents = np.array(data["latents"], dtype=np.float32)
                flipped = np.array(data["latents_flipped"], dtype=np.float32) if "latents_flipped" in data.files else None
                mask = np.array(data["alpha_mask"], dtype=np.float32) if "alpha_mask" in data.files else None
        except Exception:  # unreadable / partial / foreign file: recompute
            return None
        if need_flipped and flipped is None:
            return None
        if mask_hw is not None:
            if mask is None or tuple(mask.shape) != tuple(mask_hw) or not np.isfinite(mask).all():
                return None
        else:
            mask = None
        for arr in (latents, flipped):
            if arr is None:
                continue
            if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(spatial) or not np.isfinite(arr).all():
                return None
        return latents, flipped, mask

    def save(
        self,
        key: str,
        latents: np.ndarray,
        flipped: np.ndarray | None,
        original_size: tuple[int, int],
        crop_ltrb: tuple[int, int, int, int],
        alpha_mask: np.ndarray | None = None,
    ) -> str:
        """Write ``<key>.npz`` atomically; return its path."""
        os.makedirs(self.folder, exist_ok=True)
        arrays = {
            "latents": np.asarray(latents, dtype=np.float32),
            "original_size": np.asarray(original_size, dtype=np.int64),
            "crop_ltrb": np.asarray(crop_ltrb, dtype=np.int64),
            "key": np.asarray(key),
        }
        if flipped is not None:
            arrays["latents_flipped"] = np.asarray(flipped, dtype=np.float32)
        if alpha_mask is not None:
            arrays["alpha_mask"] = np.asarray(alpha_mask, dtype=np.float32)
        final = self.path_for(key)
        with atomic_write(final, "wb") as f:
            np.savez(f, **arrays)
        return final
