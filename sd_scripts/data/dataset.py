"""The training dataset: bucketed batches, augmentations, captions, latent cache.

``TrainDataset(plan, config, seed)`` turns a :class:`~.dataset_plan.DatasetPlan` into batches:

* every image is placed in a bucket (kohya's rules, :mod:`.buckets`) once per repeat; a batch
  never mixes buckets (nor datasets of a ``dataset_config``); ``len()`` is batches per epoch;
  without ``enable_bucket`` every image is resized to cover ``resolution`` and cropped to it
  (kohya would instead require images of exactly that size);
* ``set_epoch(e)`` (1-based) shuffles the contents of every bucket and the order of the batches
  from ``seed`` and ``e`` alone, so a run and its resume see the same order;
* ``__getitem__(i)`` draws its random choices (caption dropout/shuffle, flips, random crops,
  colour changes) from a generator seeded by ``(seed, epoch, i)``: the same batch index in the
  same epoch always gives the same batch, in any process and in any order of access;
* subsets with ``alpha_mask`` (kohya's) add ``alpha_masks`` to the batch: each image's alpha channel
  (ones without one) resized, cropped and flipped with the image, float32 ``[B, H, W]`` in 0..1; their
  colour channels are used as stored, not composited on white.

Iterate it in index order (``DataLoader(ds, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])``);
the shuffling is done here. The epoch and step live in a small shared-memory array, so DataLoader
worker processes (persistent ones too) follow ``set_epoch``/``set_step`` of the main process.
"""

from __future__ import annotations

import multiprocessing
import random
from multiprocessing.context import get_spawning_popen
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.buckets import BucketManager, bucket_info as make_bucket_info, crop_ltrb, crop_offsets
from sd_scripts.data.captions import process_caption
from sd_scripts.data.dataset_plan import DatasetPlan, ImageRecord, place_in_buckets
from sd_scripts.core.errors import DatasetError
from sd_scripts.data.images import ImageProblem, load_image, load_image_with_alpha, resize_image
from sd_scripts.data.latent_cache import DiskLatentCache, cache_key, file_digest, resolve_cache_dir

__all__ = ["TrainDataset", "color_aug", "rgb_to_hsv", "hsv_to_rgb"]

EncodeFn = Callable[[Any], Any]


@dataclass
class _Item:
    """An image placed in a bucket (one per image record, shared by its repeats)."""

    record: ImageRecord
    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float
    crop_ltrb: tuple[int, int, int, int]


# --------------------------------------------------------------------------- colour augmentation


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 1] (..., 3) -> HSV with hue in [0, 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    return np.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya's colour augmentation on a uint8 RGB array: with p=0.33, either (p=0.5) a hue shift
    uniform in +-8 OpenCV hue units (of 180, i.e. +-16 degrees) or a gamma in U(0.95, 1.05).

    The gamma is applied to values normalised to [0, 1] (what the augmentation it replaced did);
    kohya's current code raises raw 0..255 values to the power, which is a much stronger change.
    """
    if rng.random() > 0.33:
        return image
    x = image.astype(np.float32) / 255.0
    if rng.random() > 0.5:
        shift = rng.uniform(-8.0, 8.0) / 180.0
        hsv = rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        x = hsv_to_rgb(hsv)
    else:
        x = np.power(x, rng.uniform(0.95, 1.05))
    return (x * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- dataset


@dataclass
class _LatentStore:
    """Cached latents by item index: the image's, its mirror image's (flip_aug) and its alpha mask."""

    latents: dict[int, Any] = field(default_factory=dict)
    flipped: dict[int, Any] = field(default_factory=dict)
    masks: dict[int, Any] = field(default_factory=dict)


class TrainDataset:
    """Batches of a :class:`DatasetPlan` (see the module docstring)."""

    def __init__(self, plan: DatasetPlan, config: TrainConfig, seed: int | None):
        self.plan = plan
        self.config = config
        self.seed = int(seed) if seed is not None else 0
        self.prior_loss_weight = float(config.prior_loss_weight)
        # [epoch, step, max_train_steps], shared with DataLoader worker processes
        self._shared = multiprocessing.RawArray("q", [1, 0, int(config.max_train_steps or 0)])
        self._built_epoch = 0
        self._latents: dict[int, Any] | None = None
        self._latents_flipped: dict[int, Any] = {}
        self._masks: dict[int, Any] = {}  # cached alpha masks (float32 [H, W], unflipped) of alpha_mask subsets

        self._items: list[_Item] = []
        self._managers: list[BucketManager] = []
        # per dataset: {bucket: [item index, repeated]}
        self._bucket_lists: list[dict[tuple[int, int], list[int]]] = []
        for manager, placements in place_in_buckets(plan):
            self._managers.append(manager)
            lists: dict[tuple[int, int], list[int]] = {}
            for p in placements:
                item = _Item(p.record, p.bucket, p.resized, p.ar_error, crop_ltrb(p.bucket, p.record.size))
                self._items.append(item)
                lists.setdefault(p.bucket, []).extend([len(self._items) - 1] * p.record.repeats)
            self._bucket_lists.append(dict(sorted(lists.items())))
        self._batches: list[list[int]] = []
        self.set_epoch(1)

    # ----------------------------------------------------------------- epochs and steps

    def _make_batches(self, rng: random.Random | None) -> list[list[int]]:
        batches: list[list[int]] = []
        for d, lists in enumerate(self._bucket_lists):
            bs = self.plan.datasets[d].batch_size
            for bucket in sorted(lists):
                members = list(lists[bucket])
                if rng is not None:
                    rng.shuffle(members)
                batches.extend(members[i : i + bs] for i in range(0, len(members), bs))
        if rng is not None:
            rng.shuffle(batches)
        return batches

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # an ordinary pickle/copy, not a worker process start: freeze
            state["_shared"] = list(self._shared)
        return state

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    @property
    def step(self) -> int:
        return int(self._shared[1])

    @property
    def max_train_steps(self) -> int:
        return int(self._shared[2])

    def _build_epoch(self, epoch: int) -> None:
        self._batches = self._make_batches(random.Random(f"lets-dataset/{self.seed}/epoch/{epoch}"))
        self._built_epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (1-based): shuffle bucket contents and batch order from seed and epoch."""
        epoch = int(epoch)
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        self._shared[0] = epoch
        self._build_epoch(epoch)

    def set_step(self, step: int, max_steps: int | None = None) -> None:
        """The current optimizer step (for token warm-up) and the run's length."""
        self._shared[1] = int(step)
        if max_steps is not None:
            self._shared[2] = int(max_steps)

    # ----------------------------------------------------------------- metadata

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self._batches)

    @property
    def num_train_images(self) -> int:
        return self.plan.num_train_images

    @property
    def num_reg_images(self) -> int:
        return self.plan.num_reg_images

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        return self.plan.tag_frequency

    @property
    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        return self.plan.dataset_dirs

    @property
    def reg_dataset_dirs(self) -> dict[str, dict[str, int]]:
        return self.plan.reg_dataset_dirs

    def dataset_bucket_info(self, dataset: int) -> dict:
        """kohya's ``bucket_info`` of one dataset."""
        counts = {bucket: len(members) for bucket, members in self._bucket_lists[dataset].items()}
        errors = [it.ar_error for it in self._items if it.record.dataset == dataset]
        return make_bucket_info(counts, errors, self._managers[dataset].sorted_resos())

    @property
    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info`` (of the first dataset when a dataset_config has several)."""
        return self.dataset_bucket_info(0)

    def datasets_metadata(self) -> list[dict]:
        """kohya's ``ss_datasets`` list (used with a dataset_config)."""
        out = []
        for d, spec in enumerate(self.plan.datasets):
            out.append(
                {
                    "is_dreambooth": not any(s.metadata_file for s in self.plan.subsets_of(d)),
                    "batch_size_per_device": spec.batch_size,
                    "num_train_images": spec.num_train_images,
                    "num_reg_images": spec.num_reg_images,
                    "resolution": spec.resolution,
                    "enable_bucket": spec.enable_bucket,
                    "min_bucket_reso": spec.min_bucket_reso,
                    "max_bucket_reso": spec.max_bucket_reso,
                    "tag_frequency": spec.tag_frequency,
                    "bucket_info": self.dataset_bucket_info(d),
                    "subsets": [s.metadata() for s in self.plan.subsets_of(d)],
                }
            )
        return out

    @property
    def latents_cached(self) -> bool:
        return self._latents is not None

    # ----------------------------------------------------------------- images

    def _image_array(
        self,
        item: _Item,
        crop_rng: random.Random | None = None,
        color_rng: random.Random | None = None,
        flip: bool = False,
    ) -> np.ndarray:
        return self._image_and_mask(item, crop_rng, color_rng, flip)[0]

    def _image_and_mask(
        self,
        item: _Item,
        crop_rng: random.Random | None = None,
        color_rng: random.Random | None = None,
        flip: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The bucket-sized uint8 RGB array and, for an ``alpha_mask`` subset, its alpha mask (float32
        ``[H, W]`` in 0..1, all ones for an opaque image) resized, cropped and flipped like the image;
        else ``None``."""
        record = item.record
        subset = self.plan.subsets[record.subset]
        alpha = None
        try:
            if subset.alpha_mask:
                img, alpha = load_image_with_alpha(record.path)
            else:
                img = load_image(record.path)
        except (ImageProblem, OSError) as e:
            raise DatasetError(
                f"train_data_dir: image '{record.path}' cannot be read any more ({e}); restore it or restart to rescan"
            ) from None
        if img.size != tuple(record.size):
            raise DatasetError(
                f"train_data_dir: image '{record.path}' changed size since the dataset was scanned "
                f"({record.size[0]}x{record.size[1]} -> {img.size[0]}x{img.size[1]}); restart to rescan"
            )
        img = resize_image(img, item.resized, subset.resize_interpolation)
        if alpha is not None:  # the alpha as its own channel: RGBA resizing would premultiply the colours
            alpha = resize_image(alpha, item.resized, subset.resize_interpolation)
        left, top = crop_offsets(item.resized, item.bucket, crop_rng)
        box = (left, top, left + item.bucket[0], top + item.bucket[1])
        if (left, top, *item.bucket) != (0, 0, *img.size):
            img = img.crop(box)
            alpha = alpha.crop(box) if alpha is not None else None
        arr = np.asarray(img, dtype=np.uint8)
        if color_rng is not None:
            arr = color_aug(arr, color_rng)
        mask = None
        if subset.alpha_mask:
            if alpha is None:
                mask = np.ones((item.bucket[1], item.bucket[0]), dtype=np.float32)
            else:
                mask = np.asarray(alpha, dtype=np.float32) / 255.0
        if flip:
            arr = arr[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        return np.ascontiguousarray(arr), (np.ascontiguousarray(mask) if mask is not None else None)

    @staticmethod
    def _to_tensor(arrays: list[np.ndarray]):
        import torch

        stacked = np.stack(arrays).astype(np.float32)
        stacked = stacked / 127.5 - 1.0
        return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------- batches

    def batch_rng(self, index: int, epoch: int | None = None) -> random.Random:
        """The generator of batch ``index`` of ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return random.Random(f"lets-dataset/{self.seed}/batch/{epoch}/{index}")

    def __getitem__(self, index: int) -> dict:
        import torch

        epoch, step, max_steps = self.epoch, self.step, self.max_train_steps
        if self._built_epoch != epoch:  # a worker process after the main process changed epoch
            self._build_epoch(epoch)
        if index < 0:
            index += len(self._batches)
        if not 0 <= index < len(self._batches):
            raise IndexError(index)
        rng = self.batch_rng(index, epoch)
        captions, paths, flips, weights, multipliers = [], [], [], [], []
        original_hw, crop_tl, target_hw = [], [], []
        arrays: list[np.ndarray] = []
        latents = []
        masks: list[Any] = []  # per image: float32 [H, W] tensor, or None (no alpha_mask: all ones)
        for item_index in self._batches[index]:
            item = self._items[item_index]
            record = item.record
            subset = self.plan.subsets[record.subset]
            captions.append(
                process_caption(record.caption, subset.captions, rng, epoch, step, max_steps)
            )
            flip = bool(subset.flip_aug and rng.random() < 0.5)
            if self._latents is not None:
                latents.append((self._latents_flipped[item_index] if flip else self._latents[item_index]).float())
                mask = self._masks.get(item_index)
                masks.append(None if mask is None else (torch.flip(mask, dims=[1]) if flip else mask))
            else:
                arr, mask = self._image_and_mask(
                    item,
                    crop_rng=rng if subset.random_crop else None,
                    color_rng=rng if subset.color_aug else None,
                    flip=flip,
                )
                arrays.append(arr)
                masks.append(None if mask is None else torch.from_numpy(mask))
            bw, bh = item.bucket
            left, top, right, _bottom = item.crop_ltrb
            if flip:
                left = bw - right
            paths.append(record.path)
            flips.append(flip)
            weights.append(self.prior_loss_weight if record.is_reg else 1.0)
            multipliers.append(self.plan.datasets[record.dataset].network_multiplier)
            original_hw.append((int(record.size[1]), int(record.size[0])))
            crop_tl.append((int(top), int(left)))
            target_hw.append((int(bh), int(bw)))
        alpha_masks = None
        if any(m is not None for m in masks):  # images of subsets without alpha_mask count fully
            bw, bh = self._items[self._batches[index][0]].bucket
            alpha_masks = torch.stack([torch.ones(bh, bw) if m is None else m for m in masks])
        return {
            "latents": torch.stack(latents) if latents else None,
            "images": self._to_tensor(arrays) if arrays else None,
            "alpha_masks": alpha_masks,
            "captions": captions,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "image_paths": paths,
            "flipped": flips,
            "original_sizes_hw": original_hw,
            "crop_top_lefts": crop_tl,
            "target_sizes_hw": target_hw,
            "network_multipliers": multipliers,
        }

    # ----------------------------------------------------------------- latent cache

    def _cache_settings(self, item: _Item, settings_key: str) -> dict:
        subset = self.plan.subsets[item.record.subset]
        return {
            "bucket": list(item.bucket),
            "resized": list(item.resized),
            "crop": list(crop_offsets(item.resized, item.bucket)),
            "interpolation": subset.resize_interpolation or "auto",
            "vae": settings_key,
            **({"alpha_mask": True} if subset.alpha_mask else {}),
        }

    def cache_latents(
        self,
        encode_fn: EncodeFn,
        vae_batch_size: int = 1,
        to_disk: bool = False,
        settings_key: str = "",
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Encode every image once (and its mirror image when its subset has flip_aug).

        ``encode_fn`` maps a float tensor ``[B, 3, H, W]`` in [-1, 1] (on the CPU) to unscaled
        latents ``[B, C, H/8, W/8]``. With ``to_disk`` the latents are also kept in the disk cache
        (:mod:`.latent_cache`), reused when the image content and ``settings_key`` (the VAE's
        identity) and the bucket placement are unchanged. The alpha masks of ``alpha_mask`` subsets are
        kept with the latents (in memory and in the disk files). ``progress(done, total)`` is called after
        each VAE batch. Raises ``DatasetError`` naming the image when latents are not finite.
        """
        for item in self._items:
            subset = self.plan.subsets[item.record.subset]
            if subset.color_aug or subset.random_crop:
                raise DatasetError(
                    "cache_latents and color_aug/random_crop cannot be used together: cached latents cannot change "
                    "every step; turn off color_aug and random_crop or cache_latents",
                    "cache_latents",
                )
        vae_batch_size = max(1, int(vae_batch_size or 1))
        store = _LatentStore()
        cache = DiskLatentCache(resolve_cache_dir(self.config, self.plan)) if to_disk else None
        keys: dict[int, str] = {}
        digests: dict[str, str] = {}  # image path -> content digest, each file read once
        todo = [index for index in range(len(self._items))
                if cache is None or not self._load_cached(cache, index, settings_key, keys, digests, store)]
        groups = self._vae_batches(todo, vae_batch_size)
        done = 0
        total = len(todo)
        for group in groups:
            self._encode_group(encode_fn, group, store)
            if cache is not None:
                for i in group:
                    item = self._items[i]
                    f = store.flipped.get(i)
                    cache.save(
                        keys[i],
                        store.latents[i].float().numpy(),
                        None if f is None else f.float().numpy(),
                        item.record.size,
                        item.crop_ltrb,
                        None if i not in store.masks else store.masks[i].numpy(),
                    )
            done += len(group)
            if progress is not None:
                progress(done, total)
        self._latents = store.latents
        self._latents_flipped = store.flipped
        self._masks = store.masks

    def _load_cached(self, cache: DiskLatentCache, index: int, settings_key: str, keys: dict[int, str],
                     digests: dict[str, str], store: _LatentStore) -> bool:
        """Item ``index``'s latents (and mirror image, mask) from the disk cache into ``store``; False when the cache
        lacks them. Its cache key goes into ``keys`` either way."""
        import torch

        item = self._items[index]
        subset = self.plan.subsets[item.record.subset]
        path = item.record.path
        if path not in digests:
            try:
                digests[path] = file_digest(path)
            except OSError as e:
                raise DatasetError(
                    f"train_data_dir: image '{path}' cannot be read any more ({e.strerror}); restore it or restart to rescan"
                ) from None
        keys[index] = key = cache_key(digests[path], self._cache_settings(item, settings_key))
        spatial = (item.bucket[1] // 8, item.bucket[0] // 8)
        found = cache.load(key, spatial, subset.flip_aug, (item.bucket[1], item.bucket[0]) if subset.alpha_mask else None)
        if found is None:
            return False
        store.latents[index] = torch.from_numpy(found[0])
        if subset.flip_aug:
            store.flipped[index] = torch.from_numpy(found[1])
        if subset.alpha_mask:
            store.masks[index] = torch.from_numpy(found[2])
        return True

    def _vae_batches(self, todo: list[int], vae_batch_size: int) -> list[list[int]]:
        """The items to encode grouped by bucket (largest first, as kohya sorts by area), at most vae_batch_size
        to a group."""
        todo = sorted(todo, key=lambda i: (-self._items[i].bucket[0] * self._items[i].bucket[1], self._items[i].bucket, i))
        groups: list[list[int]] = []
        for index in todo:
            if groups and self._items[groups[-1][0]].bucket == self._items[index].bucket and len(groups[-1]) < vae_batch_size:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def _encode_group(self, encode_fn: EncodeFn, group: list[int], store: _LatentStore) -> None:
        """Encode one VAE batch (and the mirror images of its flip_aug items) into ``store``, masks kept."""
        import torch

        pairs = [self._image_and_mask(self._items[i]) for i in group]
        images = self._to_tensor([arr for arr, _mask in pairs])
        for i, (_arr, mask) in zip(group, pairs):
            if mask is not None:
                store.masks[i] = torch.from_numpy(mask)
        out = self._encode(encode_fn, images, group)
        flip_members = [k for k, i in enumerate(group) if self.plan.subsets[self._items[i].record.subset].flip_aug]
        out_flip = None
        if flip_members:
            out_flip = self._encode(encode_fn, torch.flip(images[flip_members], dims=[3]), [group[k] for k in flip_members])
        for k, i in enumerate(group):
            store.latents[i] = out[k]
        if out_flip is not None:
            for j, k in enumerate(flip_members):
                store.flipped[group[k]] = out_flip[j]

    def _encode(self, encode_fn: EncodeFn, images, indices: list[int]):
        import torch

        with torch.no_grad():
            out = encode_fn(images)
        out = out.detach().to("cpu")
        bucket = self._items[indices[0]].bucket
        expected = (bucket[1] // 8, bucket[0] // 8)
        if out.ndim != 4 or out.shape[0] != len(indices) or tuple(out.shape[2:]) != expected:
            raise ValueError(
                f"encode_fn returned shape {tuple(out.shape)}; expected [{len(indices)}, C, {expected[0]}, {expected[1]}]"
            )
        finite = torch.isfinite(out.float()).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = self._items[indices[int((~finite).nonzero()[0])]].record.path
            raise DatasetError(
                f"cache_latents: the VAE produced NaN/inf latents for image '{bad}'; check that image, or use a "
                f"float32 VAE (mixed_precision no, or another vae)",
                "cache_latents",
            )
        return out
