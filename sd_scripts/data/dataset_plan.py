"""The dataset plan: what :func:`sd_scripts.data.dataset_layout.scan_dataset` finds before a model is loaded.

A :class:`DatasetPlan` holds the datasets (:class:`DatasetSpec`: resolution, batch size, buckets), their subsets
(:class:`SubsetSpec`: one folder or metadata file with its caption and augmentation settings) and every usable image
(:class:`ImageRecord`), plus what the metadata records (tag frequencies, folders) and the scan's warnings.
:func:`place_in_buckets` puts each image in its bucket, the one assignment every user of a plan shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sd_scripts.data.buckets import BucketManager
from sd_scripts.data.captions import CaptionSettings

__all__ = ["SubsetSpec", "DatasetSpec", "ImageRecord", "DatasetPlan", "Placement", "place_in_buckets"]


@dataclass
class SubsetSpec:
    """One folder of images with its settings (kohya's DreamBooth subset)."""

    image_dir: str
    name: str
    dataset: int
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    captions: CaptionSettings
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    resize_interpolation: str | None = None
    img_count: int = 0
    alpha_mask: bool = False
    metadata_file: str | None = None  # a fine-tuning subset: captions from this kohya metadata JSON

    def metadata(self) -> dict:
        """The subset's entry in kohya's ``ss_datasets`` metadata."""
        c = self.captions
        if self.metadata_file:
            kind = {"image_dir": os.path.basename(os.path.normpath(self.image_dir)),
                    "metadata_file": os.path.basename(self.metadata_file)}
        else:
            kind = {"image_dir": self.name, "class_tokens": self.class_tokens, "is_reg": self.is_reg}
        return {
            "img_count": self.img_count,
            "num_repeats": self.num_repeats,
            "color_aug": self.color_aug,
            "flip_aug": self.flip_aug,
            "random_crop": self.random_crop,
            "shuffle_caption": c.shuffle_caption,
            "keep_tokens": c.keep_tokens,
            "keep_tokens_separator": c.keep_tokens_separator or "",
            "secondary_separator": c.secondary_separator,
            "enable_wildcard": c.enable_wildcard,
            "caption_prefix": c.caption_prefix,
            "caption_suffix": c.caption_suffix,
            "resize_interpolation": self.resize_interpolation,
            **kind,
            **({"alpha_mask": True} if self.alpha_mask else {}),
        }


@dataclass
class DatasetSpec:
    """One dataset: a resolution, a batch size and bucket settings shared by its subsets."""

    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int = 0
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)

    def bucket_manager(self) -> BucketManager:
        """A fresh :class:`BucketManager` for this dataset's settings."""
        if not self.enable_bucket:
            return BucketManager(self.resolution, reso_steps=self.bucket_reso_steps, predefined=[self.resolution])
        return BucketManager(
            self.resolution,
            self.min_bucket_reso,
            self.max_bucket_reso,
            self.bucket_reso_steps,
            no_upscale=self.bucket_no_upscale,
        )


@dataclass
class ImageRecord:
    """One usable image. ``size`` is ``(width, height)`` after EXIF orientation; ``repeats`` is per epoch
    (for regularization images, after 1:1 balancing)."""

    path: str
    caption: str
    subset: int
    dataset: int
    is_reg: bool
    repeats: int
    size: tuple[int, int]
    caption_source: str = "file"  # "file" | "metadata" | "class_tokens" | "none"
    tags: str | None = None  # a fine-tuning entry's "tags" (its tag frequency)


@dataclass
class DatasetPlan:
    """Everything known about the dataset before a model is loaded."""

    datasets: list[DatasetSpec]
    subsets: list[SubsetSpec]
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    validation_images: list[ImageRecord] = field(default_factory=list)  # held out (validation_split), never trained on
    warnings: list[str] = field(default_factory=list)
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency_cased: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    from_dataset_config: bool = False
    roots: list[str] = field(default_factory=list)

    def images_of(self, dataset: int) -> list[ImageRecord]:
        return [r for r in self.images if r.dataset == dataset]

    def subsets_of(self, dataset: int) -> list[SubsetSpec]:
        return [s for s in self.subsets if s.dataset == dataset]


@dataclass
class Placement:
    """Where one image trains: its bucket, the size it is resized to before the crop to the bucket, and
    ``ar_error`` (bucket aspect ratio minus the image's)."""

    record: ImageRecord
    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float


def place_in_buckets(plan: DatasetPlan, specs: list[DatasetSpec] | None = None) -> list[tuple[BucketManager, list[Placement]]]:
    """Each dataset's bucket manager and the placements of its images, in plan order: the one bucket assignment
    the training dataset, the wizard's step estimate and the dataset report share. ``specs`` replaces the plan's
    dataset settings (the wizard's current resolution and buckets)."""
    out = []
    for d, spec in enumerate(specs if specs is not None else plan.datasets):
        manager = spec.bucket_manager()
        placements = []
        for record in plan.images:
            if record.dataset == d:
                bucket, resized, ar_error = manager.select_bucket(*record.size)
                placements.append(Placement(record, bucket, resized, ar_error))
        out.append((manager, placements))
    return out
