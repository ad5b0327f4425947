"""Dataset scan and preflight: from settings to a :class:`DatasetPlan`, without loading a model.

Three ways to describe a dataset (kohya-ss/sd-scripts compatible):

* **DreamBooth folders**: ``train_data_dir`` holds subfolders named ``<repeats>_<class tokens>``
  (e.g. ``10_mychar``); each holds images and optional caption files ``<stem><caption_extension>``.
  ``reg_data_dir`` holds regularization folders named the same way.
* **``dataset_config``**: a TOML (or JSON) file in kohya's schema: ``[general]``, ``[[datasets]]``,
  ``[[datasets.subsets]]`` with ``image_dir`` etc. Every setting is looked up subset -> dataset ->
  general -> TrainConfig -> default. Unknown keys are refused.
* **Fine-tuning metadata**: ``in_json`` (images in ``train_data_dir``, ``dataset_repeats`` repeats) or a
  subset with ``metadata_file`` (and an optional ``image_dir``): kohya's ``{image_key: {"caption", "tags"}}``
  JSON, read by :mod:`.dataset_finetune`. A ``[[datasets]]`` may not mix the two kinds of subset (kohya).

:func:`scan_dataset` checks settings and folders (one-line ``ConfigError``/``DatasetError`` on a
mistake), reads captions (UTF-8), decodes every image once to find broken ones (skipped with a
warning; an error if none remain), balances regularization images 1:1 with training images
(kohya's rule), holds out ``validation_split`` of each training folder's images for the validation loss
(:mod:`.validation`; listed in ``plan.validation_images``, never trained on) and returns the plan. Warnings are returned in ``plan.warnings``. It never writes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from sd_scripts.data.buckets import BucketManager, snap_bucket_range
from sd_scripts.data.captions import CaptionSettings, count_tags
from sd_scripts.data.dataset_finetune import read_metadata_subset
from sd_scripts.core.errors import ConfigError, DatasetError, UserError, UserErrors
from sd_scripts.data.held_out import split_held_out
from sd_scripts.data.images import (
    IMAGE_EXTENSIONS,
    RESIZE_INTERPOLATIONS,
    ImageProblem,
    bomb_warnings_as_errors,
    is_hidden_name,
    is_image_file,
    probe_image,
)

__all__ = [
    "SubsetSpec",
    "DatasetSpec",
    "ImageRecord",
    "DatasetPlan",
    "Placement",
    "place_in_buckets",
    "scan_dataset",
    "parse_resolution",
    "parse_folder_name",
    "check_dataset_settings",
]

_EXAMPLE = "e.g. 10_mychar"
_MAX_LISTED = 5


# --------------------------------------------------------------------------- plan types


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


# --------------------------------------------------------------------------- small helpers


def _q(path: str) -> str:
    return f"'{path}'"


def _listing(names: list[str]) -> str:
    shown = ", ".join(_q(n) for n in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f" and {len(names) - _MAX_LISTED} more"
    return shown


def parse_resolution(value: Any, setting: str = "resolution") -> tuple[int, int]:
    """``512`` / ``"512"`` -> ``(512, 512)``; ``"512,768"`` / ``[512, 768]`` -> ``(512, 768)`` (W, H)."""
    bad = ConfigError(f"{setting}: {value!r} is not a size; use W or W,H in pixels, e.g. 512 or 512,768", setting)
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        text = value.strip().replace("x", ",").replace("X", ",")
        try:
            parts = [int(p.strip()) for p in text.split(",")]
        except ValueError:
            raise bad from None
    else:
        raise bad
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise bad
    if parts[0] <= 0 or parts[1] <= 0:
        raise ConfigError(f"{setting}: {value!r} must be positive, e.g. 512 or 512,768", setting)
    return int(parts[0]), int(parts[1])


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; ``None`` when the name does not start with a number."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


# --------------------------------------------------------------------------- settings lookup

# dataset-level keys (allowed in [general] and [[datasets]]); value kinds for the type check
_DATASET_KEYS: dict[str, str] = {
    "batch_size": "int",
    "resolution": "resolution",
    "enable_bucket": "bool",
    "min_bucket_reso": "int",
    "max_bucket_reso": "int",
    "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool",
    "network_multiplier": "float",
    "validation_seed": "int",
    "validation_split": "float",
    "resize_interpolation": "str",
}
# subset keys (allowed at all three levels)
_SUBSET_KEYS: dict[str, str] = {
    "num_repeats": "int",
    "shuffle_caption": "bool",
    "caption_separator": "str",
    "keep_tokens": "int",
    "keep_tokens_separator": "str",
    "secondary_separator": "str",
    "enable_wildcard": "bool",
    "color_aug": "bool",
    "flip_aug": "bool",
    "face_crop_aug_range": "pair",
    "random_crop": "bool",
    "caption_prefix": "str",
    "caption_suffix": "str",
    "token_warmup_min": "int",
    "token_warmup_step": "float",
    "custom_attributes": "table",
    "resize_interpolation": "str",
    "caption_dropout_rate": "float",
    "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float",
    # DreamBooth subset keys that may also be given higher up
    "caption_extension": "str",
    "class_tokens": "str",
    "cache_info": "bool",
}
# keys only a subset may have
_SUBSET_ONLY_KEYS: dict[str, str] = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool", "metadata_file": "str"}
# DreamBooth keys that kohya refuses in a fine-tuning (metadata_file) subset and its dataset; [general] may hold them
_DREAMBOOTH_ONLY_KEYS = ("is_reg", "class_tokens", "caption_extension", "cache_info")
_UNSUPPORTED_SUBSET_KEYS = {
    "conditioning_data_dir": "ControlNet datasets and conditioning-image masks are not supported; for masked_loss "
                             "use transparent images with alpha_mask = true",
}

_GENERAL_ALLOWED = {**_DATASET_KEYS, **_SUBSET_KEYS}
_DATASET_ALLOWED = {**_DATASET_KEYS, **_SUBSET_KEYS, "subsets": "list"}
_SUBSET_ALLOWED = {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}

# TrainConfig attribute that supplies a key when no TOML level gives it
_CONFIG_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
_DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "resolution": None,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "network_multiplier": 1.0,
    "num_repeats": 1,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": None,
    "secondary_separator": None,
    "enable_wildcard": False,
    "color_aug": False,
    "flip_aug": False,
    "random_crop": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "resize_interpolation": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "caption_extension": ".txt",
    "class_tokens": None,
    "is_reg": False,
    "alpha_mask": False,
}


class _Lookup:
    """First non-None of subset -> dataset -> general -> config -> default, remembering where it came from."""

    def __init__(self, config: Any, levels: list[tuple[dict, str]]):
        self.config = config
        self.levels = levels  # (table, description) from most to least specific

    def get(self, key: str) -> tuple[Any, str | None]:
        for table, where in self.levels:
            if table.get(key) is not None:
                return table[key], where
        value = getattr(self.config, _CONFIG_NAME.get(key, key), None)
        if key == "caption_extension" and getattr(self.config, "caption_extention", None):
            value = self.config.caption_extention  # kohya's old misspelling wins, as in kohya
        if value is not None:
            return value, None
        return _DEFAULTS.get(key), None

    def value(self, key: str) -> Any:
        return self.get(key)[0]


def _setting_error(key: str, where: str | None, message: str) -> ConfigError:
    place = f" ({where})" if where else ""
    return ConfigError(f"{key}{place}: {message}", key)


def _check_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            return True
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if kind == "table":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    return True


_KIND_TEXT = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": "a quoted string",
    "resolution": "a number or [width, height]",
    "pair": "a list of two numbers",
    "table": "a table",
    "list": "a list of tables",
}


def _check_table(table: Any, allowed: dict[str, str], where: str, path: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"dataset_config: {where} in '{path}' must be a table; see kohya's dataset config format", "dataset_config")
    for key, value in table.items():
        if key not in allowed:
            if key in _UNSUPPORTED_SUBSET_KEYS:
                raise ConfigError(f"dataset_config: '{key}' in {where} of '{path}': {_UNSUPPORTED_SUBSET_KEYS[key]}", "dataset_config")
            if key in _SUBSET_ONLY_KEYS:
                hint = f"'{key}' belongs in a [[datasets.subsets]] table"
            elif key in _DATASET_KEYS:
                hint = f"'{key}' belongs in [general] or [[datasets]], not in a subset"
            else:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f"did you mean '{close[0]}'?" if close else "remove it or fix its spelling"
            raise ConfigError(f"dataset_config: unknown key '{key}' in {where} of '{path}'; {hint}", "dataset_config")
        kind = allowed[key]
        if not _check_kind(value, kind):
            raise ConfigError(
                f"dataset_config: '{key}' in {where} of '{path}' must be {_KIND_TEXT[kind]}, got {value!r}",
                "dataset_config",
            )
    return table


def _load_dataset_config(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"dataset_config: file '{path}' does not exist; check the path", "dataset_config")
    if os.path.isdir(path):
        raise ConfigError(f"dataset_config: '{path}' is a folder; give the .toml file", "dataset_config")
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"dataset_config: '{path}' is not UTF-8 text; save it as UTF-8", "dataset_config") from None
    except OSError as e:
        raise ConfigError(f"dataset_config: cannot read '{path}' ({e.strerror}); check the file", "dataset_config") from None
    try:
        if path.lower().endswith(".json"):
            doc = json.loads(text)
        else:
            doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "JSON" if path.lower().endswith(".json") else "TOML"
        raise ConfigError(f"dataset_config: '{path}' is not valid {kind} ({e}); fix the file", "dataset_config") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"dataset_config: '{path}' must hold [general] and [[datasets]] tables", "dataset_config")
    for key in doc:
        if key not in ("general", "datasets"):
            raise ConfigError(
                f"dataset_config: unknown key '{key}' at the top of '{path}'; use [general], [[datasets]] and [[datasets.subsets]]",
                "dataset_config",
            )
    return doc


# --------------------------------------------------------------------------- checks


def _check_range(lookup: _Lookup, key: str, low: float | None = None, high: float | None = None, hint: str = "") -> Any:
    value, where = lookup.get(key)
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _setting_error(key, where, f"{value!r} is not a number")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            span = f"between {low} and {high}"
        elif low is not None:
            span = f"at least {low}"
        else:
            span = f"at most {high}"
        raise _setting_error(key, where, f"must be {span}, got {value}{hint}")
    return value


def _combine(errors: list[UserError]) -> UserError:
    """One error as itself, several (deduplicated, order kept) as :class:`UserErrors`."""
    flat: list[UserError] = []
    seen: set[str] = set()
    for e in errors:
        for one in (e.errors if isinstance(e, UserErrors) else [e]):
            if str(one) not in seen:
                seen.add(str(one))
                flat.append(one)
    return flat[0] if len(flat) == 1 else UserErrors(flat)


def _dataset_spec(lookup: _Lookup) -> DatasetSpec:
    errs: list[UserError] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except UserError as e:
            errs.append(e)
            return None

    res_value, res_where = lookup.get("resolution")
    resolution = None
    if res_value is None:
        errs.append(ConfigError("resolution: not set; give the training resolution, e.g. 512 or 512,768", "resolution"))
    else:
        try:
            resolution = parse_resolution(res_value)
        except ConfigError as e:
            errs.append(_setting_error("resolution", res_where, str(e).split(": ", 1)[1]) if res_where else e)
    batch_size, batch_where = lookup.get("batch_size")
    if batch_where is not None:  # from config, train_batch_size is checked by _dataset_settings_errors
        batch_size = attempt(_check_range, lookup, "batch_size", 1)
    enable_bucket = bool(lookup.value("enable_bucket"))
    steps, steps_where = lookup.get("bucket_reso_steps")
    steps = attempt(_check_range, lookup, "bucket_reso_steps", 8)
    if steps is not None and steps % 8 != 0:
        errs.append(_setting_error("bucket_reso_steps", steps_where, f"{steps} is not a multiple of 8 (latents are 1/8 size); use 64"))
        steps = None
    no_upscale = bool(lookup.value("bucket_no_upscale"))
    min_reso, min_where = lookup.get("min_bucket_reso")
    max_reso, max_where = lookup.get("max_bucket_reso")
    if enable_bucket:
        if resolution is not None and steps is not None:
            w, h = resolution
            if w % steps or h % steps:
                errs.append(_setting_error(
                    "resolution",
                    res_where,
                    f"{w},{h} is not a multiple of bucket_reso_steps ({steps}); use e.g. {max(steps, round(w / steps) * steps)}",
                ))
        if steps is not None:
            min_reso, max_reso = snap_bucket_range(int(min_reso), int(max_reso), steps)
            if min_reso <= 0:
                errs.append(_setting_error("min_bucket_reso", min_where, f"must be at least bucket_reso_steps ({steps})"))
            elif min_reso > max_reso:
                errs.append(_setting_error("min_bucket_reso", min_where, f"{min_reso} is larger than max_bucket_reso ({max_reso}); lower it"))
            elif not no_upscale and resolution is not None:
                w, h = resolution
                if min_reso > min(w, h):
                    errs.append(_setting_error(
                        "min_bucket_reso", min_where, f"{min_reso} is larger than the resolution's short side ({min(w, h)}); lower it"
                    ))
                if max_reso < max(w, h):
                    errs.append(_setting_error(
                        "max_bucket_reso", max_where, f"{max_reso} is smaller than the resolution's long side ({max(w, h)}); raise it"
                    ))
    elif resolution is not None and (resolution[0] % 8 or resolution[1] % 8):
        w, h = resolution
        errs.append(_setting_error("resolution", res_where, f"{w},{h} is not a multiple of 8; use e.g. {round(w / 8) * 8}"))
    multiplier = attempt(_check_range, lookup, "network_multiplier")
    # from the config, validation_split/validation_seed are checked by preflight (their declared ranges)
    split, split_where = lookup.get("validation_split")
    if split_where is not None and (isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1):
        errs.append(_setting_error("validation_split", split_where, f"must be from 0 (off) to below 1 (the share of "
                                   f"images held out, e.g. 0.1), got {split!r}"))
        split = None
    val_seed, seed_where = lookup.get("validation_seed")
    if seed_where is not None and (isinstance(val_seed, bool) or not isinstance(val_seed, int)):
        errs.append(_setting_error("validation_seed", seed_where, f"must be a whole number, got {val_seed!r}"))
    if errs:
        raise _combine(errs)
    w, h = resolution
    return DatasetSpec(
        resolution=resolution,
        batch_size=int(batch_size),
        enable_bucket=enable_bucket,
        min_bucket_reso=int(min_reso),
        max_bucket_reso=int(max_reso),
        bucket_reso_steps=int(steps),
        bucket_no_upscale=no_upscale,
        network_multiplier=float(multiplier if multiplier is not None else 1.0),
        validation_split=float(split) if isinstance(split, (int, float)) and 0 <= split < 1 else 0.0,
        validation_seed=int(val_seed) if isinstance(val_seed, int) else int(lookup.value("seed") or 0),
    )


def _subset_spec(lookup: _Lookup, image_dir: str, dataset: int, num_repeats: int | None, class_tokens: str | None,
                 is_reg: bool, metadata_file: str | None = None) -> SubsetSpec:
    if num_repeats is None:
        num_repeats, where = lookup.get("num_repeats")
        if where is not None:  # from the config: dataset_repeats, checked once by _collect_layout
            num_repeats = _check_range(lookup, "num_repeats", 1)
    ext, ext_where = lookup.get("caption_extension")
    if metadata_file:
        ext = ".txt"  # a fine-tuning subset reads no caption files
    elif not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
        raise _setting_error("caption_extension", ext_where, f"{ext!r} must start with a dot, e.g. .txt")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        _check_range(lookup, key, 0.0, 1.0)
    _check_range(lookup, "caption_dropout_every_n_epochs", 0)
    _check_range(lookup, "keep_tokens", 0)
    _check_range(lookup, "token_warmup_min", 0)
    _check_range(lookup, "token_warmup_step", 0)
    interp, interp_where = lookup.get("resize_interpolation")
    if interp is not None and str(interp).lower() not in RESIZE_INTERPOLATIONS:
        raise _setting_error("resize_interpolation", interp_where, f"{interp!r} is not one of {', '.join(RESIZE_INTERPOLATIONS)}")
    sep = lookup.value("caption_separator") or ","
    keep_sep, keep_sep_where = lookup.get("keep_tokens_separator")
    if keep_sep and keep_sep.strip() == sep.strip():
        raise _setting_error("keep_tokens_separator", keep_sep_where, f"{keep_sep!r} is the caption_separator too, so "
                             "every tag would be fixed; use a separator of its own such as |||")
    captions = CaptionSettings(
        shuffle_caption=bool(lookup.value("shuffle_caption")),
        keep_tokens=int(lookup.value("keep_tokens") or 0),
        caption_dropout_rate=float(lookup.value("caption_dropout_rate") or 0.0),
        caption_dropout_every_n_epochs=int(lookup.value("caption_dropout_every_n_epochs") or 0),
        caption_tag_dropout_rate=float(lookup.value("caption_tag_dropout_rate") or 0.0),
        token_warmup_min=int(lookup.value("token_warmup_min") if lookup.value("token_warmup_min") is not None else 1),
        token_warmup_step=float(lookup.value("token_warmup_step") or 0),
        caption_prefix=lookup.value("caption_prefix") or None,
        caption_suffix=lookup.value("caption_suffix") or None,
        caption_separator=sep,
        keep_tokens_separator=lookup.value("keep_tokens_separator") or None,
        secondary_separator=lookup.value("secondary_separator") or None,
        enable_wildcard=bool(lookup.value("enable_wildcard")),
    )
    return SubsetSpec(
        image_dir=image_dir,
        name=os.path.basename(metadata_file) if metadata_file else os.path.basename(os.path.normpath(image_dir)),
        dataset=dataset,
        num_repeats=int(num_repeats),
        is_reg=is_reg,
        class_tokens=class_tokens,
        caption_extension=ext,
        captions=captions,
        flip_aug=bool(lookup.value("flip_aug")),
        color_aug=bool(lookup.value("color_aug")),
        random_crop=bool(lookup.value("random_crop")),
        resize_interpolation=str(interp).lower() if interp else None,
        alpha_mask=bool(lookup.value("alpha_mask")),
        metadata_file=metadata_file,
    )


def _finetune_dataset(ds_table: dict, sub_tables: list, ds_where: str, path: str) -> bool:
    """True when every subset of the dataset has metadata_file, False when none has; kohya refuses a mix, and
    DreamBooth keys in a fine-tuning dataset."""
    kinds = {isinstance(sub, dict) and "metadata_file" in sub for sub in sub_tables}
    if len(kinds) > 1:
        raise ConfigError(f"dataset_config: {ds_where} of '{path}' mixes DreamBooth subsets (image_dir) and "
                          f"fine-tuning subsets (metadata_file); put them in separate [[datasets]]", "dataset_config")
    finetune = kinds == {True}
    if finetune:
        for s, table in [(None, ds_table)] + list(enumerate(sub_tables)):
            for key in _DREAMBOOTH_ONLY_KEYS:
                if key in table:
                    where = ds_where if s is None else f"{ds_where} subset #{s + 1}"
                    raise ConfigError(f"dataset_config: '{key}' in {where} of '{path}' is for DreamBooth subsets; a "
                                      f"fine-tuning subset (metadata_file) takes its captions from the metadata; "
                                      f"remove it", "dataset_config")
    return finetune


def _resolve_near(path: str, base_dir: str) -> str:
    """``path`` as given when it exists or is absolute, else relative to the dataset_config's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(base_dir, path)
    return candidate if os.path.exists(candidate) else path


def _check_image_folder(folder: str, label: str) -> None:
    if not os.path.exists(folder):
        raise DatasetError(f"{label}: folder '{folder}' does not exist; check the path", label.split(" ")[0])
    if not os.path.isdir(folder):
        raise DatasetError(f"{label}: '{folder}' is not a folder; give the folder of images", label.split(" ")[0])


def _toml_finetune_subset(config: Any, sub: dict, ds_table: dict, general: dict, d: int, where: str, ds_where: str,
                          dataset_config: str, base_dir: str, seen: set[str], warnings: list[str]) -> SubsetSpec | None:
    """A ``metadata_file`` subset of a dataset_config (kohya's fine-tuning subset); None for a duplicate."""
    metadata_file = _resolve_near(sub["metadata_file"], base_dir)
    if not os.path.isfile(metadata_file):
        state = "is a folder" if os.path.isdir(metadata_file) else "does not exist"
        raise DatasetError(f"dataset_config metadata_file: '{sub['metadata_file']}' ({where}) {state}; give kohya's "
                           f"metadata .json file", "dataset_config")
    image_dir = sub.get("image_dir")
    if image_dir:
        image_dir = _resolve_near(image_dir, base_dir)
        _check_image_folder(image_dir, f"dataset_config image_dir ({where})")
    else:
        image_dir = os.path.dirname(os.path.abspath(metadata_file))
    key = f"{os.path.realpath(metadata_file)}|{os.path.realpath(image_dir)}"
    if key in seen:
        warnings.append(f"dataset_config: metadata_file '{sub['metadata_file']}' appears twice in {ds_where}; the "
                        f"second one is ignored")
        return None
    seen.add(key)
    lookup = _Lookup(config, [(sub, f"dataset_config {where}"), (ds_table, f"dataset_config {ds_where}"),
                              (general, "dataset_config [general]")])
    return _subset_spec(lookup, image_dir, d, None, None, False, metadata_file)


def check_dataset_settings(config: Any) -> None:
    """Config-level checks that need no folders (also run by :func:`scan_dataset`)."""
    errors = _dataset_settings_errors(config)
    if errors:
        raise _combine(errors)


def _dataset_settings_errors(config: Any) -> list[UserError]:
    errors: list[UserError] = []
    cache = bool(getattr(config, "cache_latents", False) or getattr(config, "cache_latents_to_disk", False))
    if cache:
        for key in ("color_aug", "random_crop"):
            if getattr(config, key, False):
                errors.append(ConfigError(
                    f"cache_latents and {key} cannot be used together: cached latents cannot change every step; "
                    f"turn off {key} or cache_latents",
                    "cache_latents",
                ))
    vae_bs = getattr(config, "vae_batch_size", 1)
    if vae_bs is not None and (not isinstance(vae_bs, int) or vae_bs < 1):
        errors.append(ConfigError(f"vae_batch_size: must be at least 1, got {vae_bs!r}", "vae_batch_size"))
    bs = getattr(config, "train_batch_size", 1)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        errors.append(ConfigError(f"train_batch_size: must be at least 1, got {bs!r}", "train_batch_size"))
    plw = getattr(config, "prior_loss_weight", 1.0)
    if plw is None or isinstance(plw, bool) or not isinstance(plw, (int, float)) or plw < 0 or not math.isfinite(plw):
        errors.append(ConfigError(f"prior_loss_weight: must be a number >= 0, got {plw!r}", "prior_loss_weight"))
    return errors


# --------------------------------------------------------------------------- folders


def _folder_entries(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) directly inside ``folder``, hidden ones left out, sorted."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if is_hidden_name(entry.name) or entry.name == "__MACOSX":
                continue
            try:
                if entry.is_dir():
                    dirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
            except OSError:
                continue
    return sorted(dirs), sorted(files)


def _check_root(root: str | None, setting: str) -> str:
    if not root:
        raise ConfigError(
            f"{setting}: not set; give the folder that holds your <repeats>_<name> image folders ({_EXAMPLE}) or a dataset_config",
            setting,
        )
    if not os.path.exists(root):
        raise DatasetError(f"{setting}: folder '{root}' does not exist; check the path", setting)
    if not os.path.isdir(root):
        raise DatasetError(
            f"{setting}: '{root}' is a file, not a folder; give the folder that holds the <repeats>_<name> subfolders", setting
        )
    return root


def _dreambooth_folders(root: str, setting: str, warnings: list[str]) -> list[tuple[str, int, str]]:
    """Valid ``<repeats>_<class tokens>`` subfolders of ``root`` as (path, repeats, class tokens)."""
    try:
        dirs, files = _folder_entries(root)
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read folder '{root}' ({e.strerror}); check its permissions", setting) from None
    loose_images = [f for f in files if is_image_file(f)]
    valid, invalid = [], []
    for name in dirs:
        parsed = parse_folder_name(name)
        if parsed is None or parsed[0] < 1:
            invalid.append(name)
        else:
            valid.append((os.path.join(root, name), parsed[0], parsed[1]))
    if not valid:
        if loose_images:
            raise DatasetError(
                f"{setting}: folder '{root}' has images directly inside but no <repeats>_<name> subfolders; "
                f"move them into a subfolder such as '{os.path.join(root, '10_mychar')}'",
                setting,
            )
        if invalid:
            raise DatasetError(
                f"{setting}: folder '{root}' has no <repeats>_<name> subfolders (found {_listing(invalid)}); "
                f"rename them like 10_mychar (10 = repeats per epoch, at least 1)",
                setting,
            )
        if not files:
            raise DatasetError(
                f"{setting}: folder '{root}' is empty; put your images in a subfolder named <repeats>_<name> ({_EXAMPLE})",
                setting,
            )
        raise DatasetError(
            f"{setting}: folder '{root}' has no <repeats>_<name> subfolders ({_EXAMPLE}); put your images in such a folder",
            setting,
        )
    if invalid:
        warnings.append(
            f"{setting}: ignored subfolders not named <repeats>_<name> ({_EXAMPLE}; repeats at least 1): {_listing(invalid)}"
        )
    if loose_images:
        warnings.append(
            f"{setting}: {len(loose_images)} image(s) directly inside '{root}' are not used; only <repeats>_<name> subfolders are read"
        )
    return valid


# --------------------------------------------------------------------------- captions

_OTHER_CAPTION_EXTS = (".txt", ".caption", ".tags", ".cap")


def _read_caption(path: str, setting: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read caption file '{path}' ({e.strerror}); check its permissions", setting) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{setting}: caption file '{path}' is not UTF-8 text (byte {data[e.start]:#04x} at position {e.start}); "
            f"open it and save it as UTF-8",
            setting,
        ) from None


def _caption_text(raw: str, wildcard: bool) -> str:
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        return ""
    return "\n".join(lines) if wildcard else lines[0]


def _find_caption_file(folder: str, stem: str, ext: str, names: set[str], lower_names: dict[str, str]) -> str | None:
    candidates = [stem + ext]
    tokens = stem.split("_")
    if len(tokens) >= 5:  # kohya: "face crop" file names carry 4 extra _-separated numbers
        candidates.append("_".join(tokens[:-4]) + ext)
    for cand in candidates:
        if cand in names:
            return os.path.join(folder, cand)
    for cand in candidates:
        real = lower_names.get(cand.lower())
        if real is not None:
            return os.path.join(folder, real)
    return None


# --------------------------------------------------------------------------- scan


@dataclass
class _PendingImage:
    path: str
    subset: int
    caption: str
    caption_source: str
    tags: str | None = None


def _scan_metadata_subset(subset: SubsetSpec, index: int, setting: str, warnings: list[str],
                          roots: list[str]) -> list[_PendingImage]:
    """A fine-tuning subset's images and captions from its metadata file; the images' folders join ``roots``."""
    prefix = "in_json" if setting == "in_json" else "dataset_config metadata_file"
    entries = read_metadata_subset(subset.metadata_file, subset.image_dir, prefix=prefix, setting=setting,
                                   separator=subset.captions.caption_separator,
                                   wildcard=subset.captions.enable_wildcard, warnings=warnings)
    pending = []
    known = {os.path.realpath(r) for r in roots}
    for entry in entries:
        folder = os.path.dirname(os.path.abspath(entry.path))
        if os.path.realpath(folder) not in known:  # never write among these images either
            known.add(os.path.realpath(folder))
            roots.append(folder)
        text = _caption_text(entry.caption, subset.captions.enable_wildcard)
        pending.append(_PendingImage(entry.path, index, text, "metadata" if text else "none", entry.tags))
    uncaptioned = sum(1 for p in pending if not p.caption)
    if uncaptioned:
        warnings.append(f"{prefix}: {uncaptioned} of {len(pending)} entries of '{subset.metadata_file}' have no "
                        f"caption or tags; they train with an empty caption")
    return pending


def _scan_subset(subset: SubsetSpec, index: int, setting: str, warnings: list[str],
                 caption_errors: list[UserError] | None = None, roots: list[str] | None = None) -> list[_PendingImage]:
    if subset.metadata_file:
        return _scan_metadata_subset(subset, index, setting, warnings, roots if roots is not None else [])
    folder = subset.image_dir
    try:
        dirs, files = _folder_entries(folder)
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read folder '{folder}' ({e.strerror}); check its permissions", setting) from None
    images = [f for f in files if is_image_file(f)]
    if dirs:
        nested = []
        for d in dirs:
            try:
                if any(is_image_file(n) for n in os.listdir(os.path.join(folder, d))):
                    nested.append(d)
            except OSError:
                pass
        if nested:
            warnings.append(
                f"{setting}: images in subfolders of '{folder}' are not used (found {_listing(nested)}); "
                f"make them <repeats>_<name> folders of their own"
            )
    if not images:
        warnings.append(
            f"{setting}: folder '{folder}' has no images ({' '.join(IMAGE_EXTENSIONS)}); it is skipped"
        )
        return []
    names = set(files)
    lower_names = {}
    for n in files:
        lower_names.setdefault(n.lower(), n)
    ext = subset.caption_extension
    fallback = subset.class_tokens or ""
    pending = []
    empty_files, missing = [], []
    for name in images:
        stem = os.path.splitext(name)[0]
        cap_path = _find_caption_file(folder, stem, ext, names, lower_names)
        if cap_path is not None:
            try:
                raw = _read_caption(cap_path, setting)
            except DatasetError as e:
                if caption_errors is None:
                    raise
                caption_errors.append(e)
                continue
            text = _caption_text(raw, subset.captions.enable_wildcard)
            if text:
                pending.append(_PendingImage(os.path.join(folder, name), index, text, "file"))
                continue
            empty_files.append(os.path.basename(cap_path))
        else:
            missing.append(name)
        pending.append(_PendingImage(os.path.join(folder, name), index, fallback, "class_tokens" if fallback else "none"))
    use = f"the class tokens '{fallback}'" if fallback else "an empty caption"
    if empty_files:
        warnings.append(f"{setting}: {len(empty_files)} empty caption file(s) in '{folder}' ({_listing(empty_files)}); those images use {use}")
    if missing and len(missing) < len(images):
        warnings.append(
            f"{setting}: {len(missing)} of {len(images)} images in '{folder}' have no {ext} caption ({_listing(missing)}); they use {use}"
        )
    elif missing:
        others = sorted({os.path.splitext(f)[1].lower() for f in files
                         if os.path.splitext(f)[1].lower() in _OTHER_CAPTION_EXTS and os.path.splitext(f)[1].lower() != ext.lower()})
        if others:
            warnings.append(
                f"caption_extension: no {ext} captions in '{folder}' but there are {', '.join(others)} files; "
                f"set caption_extension to {others[0]} to use them"
            )
        elif not fallback:
            warnings.append(f"{setting}: images in '{folder}' have no captions and the folder name gives no class tokens; they train with an empty caption")
    return pending


def _probe_all(paths: list[str], progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[int, int] | str]:
    """Probe every image once (in a thread pool): its size, or the reason it cannot be used."""
    unique = list(dict.fromkeys(paths))

    def one(path: str) -> tuple[int, int] | str:
        try:
            return probe_image(path)
        except ImageProblem as e:
            return str(e)
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"

    results: dict[str, tuple[int, int] | str] = {}
    workers = max(1, min(8, (os.cpu_count() or 1), len(unique)))
    with bomb_warnings_as_errors():
        if workers == 1:
            outcomes = map(one, unique)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            outcomes = pool.map(one, unique)
        try:
            for i, (path, outcome) in enumerate(zip(unique, outcomes), 1):
                results[path] = outcome
                if progress is not None:
                    progress(i, len(unique))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
    return results


def _unique_key(table: dict, key: str) -> str:
    if key not in table:
        return key
    i = 2
    while f"{key} ({i})" in table:
        i += 1
    return f"{key} ({i})"


def scan_dataset(config: Any, progress: Callable[[int, int], None] | None = None) -> DatasetPlan:
    """Check the dataset settings and folders and return the :class:`DatasetPlan`.

    Raises ``ConfigError`` / ``DatasetError`` (one line naming the setting and the fix) for one
    problem, or :class:`UserErrors` holding every independent problem found when there are several.
    ``progress(done, total)`` is called as each image has been checked.
    """
    errors: list[UserError] = _dataset_settings_errors(config)
    try:
        found = _collect_layout(config, errors)
    except UserError as e:  # a problem that makes the remaining checks meaningless
        errors.append(e)
        found = None
    if errors:
        raise _combine(errors)
    datasets, subsets, roots, subset_setting, pending, warnings, dataset_config = found
    return _finish_scan(config, progress, datasets, subsets, roots, subset_setting, pending, warnings, dataset_config)


def _collect_layout(config: Any, errors: list[UserError]):
    """Settings, folders and captions; independent problems go to ``errors``, fatal ones raise."""

    def attempt(fn, *args):
        try:
            return fn(*args)
        except UserError as e:
            errors.append(e)
            return None

    warnings: list[str] = []
    datasets: list[DatasetSpec | None] = []
    subsets: list[SubsetSpec] = []
    roots: list[str] = []
    subset_setting: list[str] = []  # setting named in messages about each subset

    if getattr(config, "caption_extention", None):
        warnings.append("caption_extention is kohya's old misspelling; it still works, but write caption_extension")
    dataset_config = getattr(config, "dataset_config", None)
    in_json = getattr(config, "in_json", None)
    repeats = getattr(config, "dataset_repeats", 1)
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        errors.append(ConfigError(f"dataset_repeats: must be a whole number of at least 1, got {repeats!r}",
                                  "dataset_repeats"))
    if dataset_config:
        ignored = [k for k in ("train_data_dir", "reg_data_dir", "in_json") if getattr(config, k, None)]
        if ignored:
            warnings.append(f"{'/'.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored because "
                            f"dataset_config is given")
        doc = _load_dataset_config(dataset_config)
        general = _check_table(doc.get("general", {}), _GENERAL_ALLOWED, "[general]", dataset_config)
        ds_tables = doc.get("datasets", [])
        if not isinstance(ds_tables, list) or not ds_tables:
            raise ConfigError(
                f"dataset_config: '{dataset_config}' has no [[datasets]]; add [[datasets]] with [[datasets.subsets]] image_dir = \"...\"",
                "dataset_config",
            )
        base_dir = os.path.dirname(os.path.abspath(dataset_config))
        for d, ds_table in enumerate(ds_tables):
            ds_where = f"[[datasets]] #{d + 1}"
            _check_table(ds_table, _DATASET_ALLOWED, ds_where, dataset_config)
            ds_lookup = _Lookup(config, [(ds_table, f"dataset_config {ds_where}"), (general, "dataset_config [general]")])
            spec = attempt(_dataset_spec, ds_lookup)
            datasets.append(spec)
            sub_tables = ds_table.get("subsets", [])
            if not sub_tables:
                errors.append(ConfigError(
                    f"dataset_config: {ds_where} of '{dataset_config}' has no [[datasets.subsets]]; add one with image_dir = \"...\"",
                    "dataset_config",
                ))
                continue
            seen_dirs: set[str] = set()
            finetune = attempt(_finetune_dataset, ds_table, sub_tables, ds_where, dataset_config)
            if finetune is None:
                continue
            for s, sub in enumerate(sub_tables):
                where = f"{ds_where} subset #{s + 1}"
                _check_table(sub, _SUBSET_ALLOWED, where, dataset_config)
                if sub.get("face_crop_aug_range") is not None or ds_table.get("face_crop_aug_range") is not None:
                    warnings.append(f"dataset_config: face_crop_aug_range in {where} is not supported and is ignored")
                if finetune:
                    subset = attempt(_toml_finetune_subset, config, sub, ds_table, general, d, where, ds_where,
                                     dataset_config, base_dir, seen_dirs, warnings)
                    if subset is not None:
                        subsets.append(subset)
                        subset_setting.append("dataset_config")
                        roots.append(subset.image_dir)
                    continue
                image_dir = sub.get("image_dir")
                if not image_dir:
                    errors.append(ConfigError(
                        f"dataset_config: {where} of '{dataset_config}' has no image_dir; add image_dir = \"path/to/images\"",
                        "dataset_config",
                    ))
                    continue
                resolved = image_dir
                if not os.path.isabs(image_dir) and not os.path.isdir(image_dir):
                    candidate = os.path.join(base_dir, image_dir)
                    if os.path.isdir(candidate):
                        resolved = candidate
                if not os.path.exists(resolved):
                    errors.append(DatasetError(f"dataset_config: image_dir '{image_dir}' ({where}) does not exist; check the path", "dataset_config"))
                    continue
                if not os.path.isdir(resolved):
                    errors.append(DatasetError(f"dataset_config: image_dir '{image_dir}' ({where}) is not a folder; give the folder of images", "dataset_config"))
                    continue
                key = os.path.realpath(resolved)
                if key in seen_dirs:
                    warnings.append(f"dataset_config: image_dir '{image_dir}' appears twice in {ds_where}; the second one is ignored")
                    continue
                seen_dirs.add(key)
                lookup = _Lookup(
                    config,
                    [(sub, f"dataset_config {where}"), (ds_table, f"dataset_config {ds_where}"), (general, "dataset_config [general]")],
                )
                class_tokens = lookup.value("class_tokens")
                subset = attempt(_subset_spec, lookup, resolved, d, None, class_tokens, bool(sub.get("is_reg", False)))
                if subset is None:
                    continue
                subsets.append(subset)
                subset_setting.append("dataset_config")
                roots.append(resolved)
    elif in_json:
        lookup = _Lookup(config, [])
        datasets.append(attempt(_dataset_spec, lookup))
        if getattr(config, "reg_data_dir", None):
            warnings.append("reg_data_dir is ignored with in_json: fine-tuning datasets have no regularization images")
        image_dir = getattr(config, "train_data_dir", None)
        if image_dir:
            _check_image_folder(image_dir, "train_data_dir")
        else:  # kohya needs the keys to be paths then; the metadata's own folder is searched too
            image_dir = os.path.dirname(os.path.abspath(in_json))
        subset = attempt(_subset_spec, lookup, image_dir, 0, None, None, False, in_json)
        if subset is not None:
            subsets.append(subset)
            subset_setting.append("in_json")
            roots.append(image_dir)
    else:
        lookup = _Lookup(config, [])
        datasets.append(attempt(_dataset_spec, lookup))
        root = _check_root(getattr(config, "train_data_dir", None), "train_data_dir")
        roots.append(root)
        for path, repeats, tokens in attempt(_dreambooth_folders, root, "train_data_dir", warnings) or []:
            subset = attempt(_subset_spec, lookup, path, 0, repeats, tokens, False)
            if subset is not None:
                subsets.append(subset)
                subset_setting.append("train_data_dir")
        reg_root = getattr(config, "reg_data_dir", None)
        if reg_root and attempt(_check_root, reg_root, "reg_data_dir") is not None:
            roots.append(reg_root)
            for path, repeats, tokens in attempt(_dreambooth_folders, reg_root, "reg_data_dir", warnings) or []:
                subset = attempt(_subset_spec, lookup, path, 0, repeats, tokens, True)
                if subset is not None:
                    subsets.append(subset)
                    subset_setting.append("reg_data_dir")

    if getattr(config, "masked_loss", False) and subsets and not any(sub.alpha_mask for sub in subsets):
        errors.append(ConfigError(
            "masked_loss: the masks come from the images' alpha channels here, and no subset has alpha_mask; "
            "set alpha_mask (or alpha_mask = true in the dataset_config subsets), or turn masked_loss off",
            "masked_loss",
        ))

    if getattr(config, "cache_latents", False) or getattr(config, "cache_latents_to_disk", False):
        for i, sub in enumerate(subsets):
            for key in ("color_aug", "random_crop"):
                if getattr(sub, key) and not getattr(config, key, False):  # set globally: reported already
                    errors.append(ConfigError(
                        f"cache_latents and {key} (set for '{sub.name}' in {subset_setting[i]}) cannot be used together: "
                        f"cached latents cannot change every step; turn off {key} or cache_latents",
                        "cache_latents",
                    ))

    # captions (every unreadable caption file is reported, the list capped)
    pending: list[_PendingImage] = []
    caption_errors: list[UserError] = []
    for i, sub in enumerate(subsets):
        try:
            pending.extend(_scan_subset(sub, i, subset_setting[i], warnings, caption_errors, roots))
        except UserError as e:
            errors.append(e)
    errors.extend(caption_errors[:_MAX_LISTED])
    if len(caption_errors) > _MAX_LISTED:
        more = len(caption_errors) - _MAX_LISTED
        setting = caption_errors[_MAX_LISTED].setting
        errors.append(DatasetError(f"{setting}: and {more} more caption file(s) that cannot be read; open them and save them as UTF-8", setting))
    return datasets, subsets, roots, subset_setting, pending, warnings, dataset_config


def _finish_scan(config: Any, progress, datasets, subsets, roots, subset_setting, pending, warnings, dataset_config) -> DatasetPlan:
    """Decode every image once and build the plan (settings, folders and captions are known good)."""
    probed = _probe_all([p.path for p in pending], progress)

    skipped: list[tuple[str, str]] = []
    skipped_seen: set[tuple[str, str]] = set()

    def skip(path: str, reason: str) -> None:
        if (path, reason) not in skipped_seen:
            skipped_seen.add((path, reason))
            skipped.append((path, reason))

    per_subset: dict[int, list[ImageRecord]] = {i: [] for i in range(len(subsets))}
    for p in pending:
        result = probed[p.path]
        if isinstance(result, str):
            skip(p.path, result)
            continue
        sub = subsets[p.subset]
        spec = datasets[sub.dataset]
        if spec.enable_bucket and spec.bucket_no_upscale and min(result) < spec.bucket_reso_steps:
            skip(p.path, f"{result[0]}x{result[1]} is smaller than bucket_reso_steps ({spec.bucket_reso_steps}) and bucket_no_upscale is on")
            continue
        per_subset[p.subset].append(
            ImageRecord(
                path=p.path,
                caption=p.caption,
                subset=p.subset,
                dataset=sub.dataset,
                is_reg=sub.is_reg,
                repeats=sub.num_repeats,
                size=result,
                caption_source=p.caption_source,
                tags=p.tags,
            )
        )

    if skipped:
        listed = "; ".join(f"'{path}' ({reason})" for path, reason in skipped[:_MAX_LISTED])
        more = f"; and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        warnings.append(f"skipped {len(skipped)} image(s) that cannot be used: {listed}{more}")

    tiny = []
    for i, records in per_subset.items():
        res = datasets[subsets[i].dataset].resolution
        for r in records:
            if max(r.size) * 2 < min(res):
                tiny.append(f"{os.path.basename(r.path)} ({r.size[0]}x{r.size[1]})")
    if tiny:
        warnings.append(f"{len(tiny)} image(s) are less than half the training resolution and will be blurry when upscaled: {_listing(tiny)}")

    # totals, regularization balancing, metadata tables
    images: list[ImageRecord] = []
    plan_tags: dict[str, dict[str, int]] = {}
    plan_tags_cased: dict[str, dict[str, int]] = {}
    dataset_dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    held_out: list[ImageRecord] = []
    too_small: list[str] = []
    for d, spec in enumerate(datasets):
        train_records, reg_records = [], []
        for i, sub in enumerate(subsets):
            if sub.dataset != d:
                continue
            records = per_subset[i]
            if spec.validation_split and not sub.is_reg and records:
                records, held = split_held_out(records, spec.validation_split, spec.validation_seed, f"{d}/{sub.name}")
                if not held:
                    too_small.append(f"{sub.name} ({len(records)})")
                held_out.extend(held)
                spec.num_validation_images += len(held)
            sub.img_count = len(records)
            # kohya counts a fine-tuning entry's "tags", not its caption
            captions = [r.tags for r in records if r.tags] if sub.metadata_file else [r.caption for r in records]
            freq = count_tags(captions, into=spec.tag_frequency.setdefault(sub.name, {}))
            if sub.name not in plan_tags:
                plan_tags[sub.name] = freq
                plan_tags_cased[sub.name] = count_tags(captions, lowercase=False)
            table = reg_dirs if sub.is_reg else dataset_dirs
            if records or not sub.is_reg:
                table[_unique_key(table, sub.name)] = {"n_repeats": sub.num_repeats, "img_count": sub.img_count}
            if sub.is_reg:
                reg_records.extend(records)
                spec.num_reg_images += sub.num_repeats * len(records)
            else:
                train_records.extend(records)
                spec.num_train_images += sub.num_repeats * len(records)
        images.extend(train_records)
        if reg_records:
            used = _balance_reg(reg_records, spec.num_train_images)
            if len(used) < len(reg_records):
                warnings.append(
                    f"{len(reg_records) - len(used)} of {len(reg_records)} regularization images are not used "
                    f"(there are more than training images x repeats)"
                )
            images.extend(used)

    if too_small:
        warnings.append(f"validation_split: {len(too_small)} folder(s) have too few images to hold one out, so all "
                        f"their images are trained on: {_listing(too_small)}")
    if too_small and not held_out:
        warnings.append("validation_split: no image is held out, so no validation loss is computed; raise "
                        "validation_split or add images")
    elif not held_out and any(getattr(config, k, None) for k in ("validate_every_n_steps", "validate_every_n_epochs",
                                                                 "max_validation_steps")):
        warnings.append("validate_every_n_steps/validate_every_n_epochs/max_validation_steps are set but "
                        "validation_split is 0, so no validation loss is computed; set validation_split, e.g. 0.1")
    if held_out and not any(not r.is_reg for r in images):
        raise DatasetError("validation_split: holding images out leaves no training image; lower validation_split",
                           "validation_split")
    if not any(not r.is_reg for r in images):
        if skipped:
            raise DatasetError(
                f"{subset_setting[0] if subset_setting else 'train_data_dir'}: none of the images can be used "
                f"({len(skipped)} skipped, e.g. '{skipped[0][0]}': {skipped[0][1]}); replace or re-save them",
                subset_setting[0] if subset_setting else "train_data_dir",
            )
        if subsets and all(sub.metadata_file for sub in subsets):
            setting = subset_setting[0]
            files = _listing(list(dict.fromkeys(sub.metadata_file for sub in subsets)))
            raise DatasetError(
                f"{'in_json' if setting == 'in_json' else 'dataset_config metadata_file'}: no usable image entries in "
                f"{files}; add entries {{\"<image name>\": {{\"caption\": \"...\"}}}} whose images are in the "
                f"image folder",
                setting,
            )
        setting = "dataset_config" if dataset_config else "train_data_dir"
        place = f"'{dataset_config}'" if dataset_config else f"'{getattr(config, 'train_data_dir', '')}'"
        raise DatasetError(
            f"{setting}: no training images found in the folders of {place}; "
            f"put .png/.jpg/.jpeg/.webp/.bmp images in <repeats>_<name> subfolders ({_EXAMPLE})",
            setting,
        )

    warnings = list(dict.fromkeys(warnings))
    plan = DatasetPlan(
        datasets=datasets,
        subsets=subsets,
        images=images,
        skipped=skipped,
        warnings=warnings,
        num_train_images=sum(s.num_train_images for s in datasets),
        num_reg_images=sum(s.num_reg_images for s in datasets),
        num_validation_images=len(held_out),
        validation_images=held_out,
        tag_frequency=plan_tags,
        tag_frequency_cased=plan_tags_cased,
        dataset_dirs=dataset_dirs,
        reg_dataset_dirs=reg_dirs,
        from_dataset_config=bool(dataset_config),
        roots=[os.path.abspath(r) for r in roots],
    )
    if getattr(config, "cache_latents_to_disk", False):
        from sd_scripts.data.latent_cache import resolve_cache_dir

        resolve_cache_dir(config, plan)
    return plan


def _balance_reg(reg_records: list[ImageRecord], num_train_images: int) -> list[ImageRecord]:
    """kohya's 1:1 balancing: register reg images (own repeats) until their total reaches the
    training total, then add one repeat per image round-robin. Returns the images used."""
    used: list[ImageRecord] = []
    n = 0
    first = True
    while n < num_train_images:
        for record in reg_records:
            if first:
                used.append(record)
                n += record.repeats
            else:
                record.repeats += 1
                n += 1
            if n >= num_train_images:
                break
        first = False
    return used
