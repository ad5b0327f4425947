"""kohya's dataset_config schema (TOML or JSON): the keys each table takes, their kinds and defaults, how a
setting is looked up (subset -> dataset -> [general] -> the run's settings -> default), and the dataset and subset
specs built from those lookups, each checked with a one-line error naming the key and where it was set.

The keys are declared once, as the fields of :class:`DatasetKeys` ([general] and [[datasets]]), :class:`SubsetKeys`
(any level) and :class:`SubsetOnlyKeys` ([[datasets.subsets]] only). A key's default is the default of the
``TrainConfig`` setting that supplies it when no table gives it (:mod:`sd_scripts.core.config`); the keys without
such a setting, and the two whose unset value means something else here (``resolution``: not set is an error;
``enable_bucket``: unset is off, as kohya's flag), say their own default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.core.rules import DATASET_RULES, check_engine_values, check_rules
from sd_scripts.core.settings import declared_in_engine
from sd_scripts.data.buckets import snap_bucket_range
from sd_scripts.data.captions import CaptionSettings
from sd_scripts.data.dataset_plan import DatasetSpec, SubsetSpec
from sd_scripts.data.images import RESIZE_INTERPOLATIONS

__all__ = ["DatasetKeys", "SubsetKeys", "SubsetOnlyKeys", "Lookup", "parse_resolution", "check_dataset_settings",
           "DATASET_SETTINGS", "dataset_spec", "subset_spec", "load_dataset_config", "check_table",
           "GENERAL_ALLOWED", "DATASET_ALLOWED", "SUBSET_ALLOWED", "DREAMBOOTH_ONLY_KEYS"]

# --------------------------------------------------------------------------- the keys

_FROM_CONFIG: Any = object()


def _key(kind: str, default: Any = _FROM_CONFIG, config: str | None = None) -> Any:
    """A key of ``kind`` ("bool", "int", "float", "str", "resolution", "pair", "table", "list"). ``config``: the
    ``TrainConfig`` setting that supplies it when no table does (default: the key's own name, when TrainConfig has
    it); the key's default is that setting's default unless ``default`` is given."""
    return dataclasses.field(default=default, metadata={"kind": kind, "config": config})


def _config_defaults(cls):
    """Give each key declared without a default the default of its TrainConfig setting (before ``@dataclass``)."""
    config_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, declared in list(vars(cls).items()):
        if isinstance(declared, dataclasses.Field) and declared.default is _FROM_CONFIG:
            setting = declared.metadata["config"] or name
            setattr(cls, name, dataclasses.field(default=config_defaults[setting], metadata=declared.metadata))
    return cls


@dataclass(frozen=True)
@_config_defaults
class DatasetKeys:
    """[general] and [[datasets]]: what a dataset's subsets share (kohya's dataset-level keys)."""

    batch_size: int = _key("int", config="train_batch_size")
    resolution: int | list = _key("resolution", None)  # not set anywhere: an error
    enable_bucket: bool = _key("bool", False)  # kohya's flag: off unless set
    min_bucket_reso: int = _key("int")
    max_bucket_reso: int = _key("int")
    bucket_reso_steps: int = _key("int")
    bucket_no_upscale: bool = _key("bool")
    network_multiplier: float = _key("float", 1.0)
    validation_seed: int = _key("int")
    validation_split: float = _key("float")
    resize_interpolation: str = _key("str", None)


@dataclass(frozen=True)
@_config_defaults
class SubsetKeys:
    """Subset keys, allowed at every level (a subset's own value wins)."""

    num_repeats: int = _key("int", config="dataset_repeats")
    shuffle_caption: bool = _key("bool")
    caption_separator: str = _key("str")
    keep_tokens: int = _key("int")
    keep_tokens_separator: str = _key("str")
    secondary_separator: str = _key("str")
    enable_wildcard: bool = _key("bool")
    color_aug: bool = _key("bool")
    flip_aug: bool = _key("bool")
    face_crop_aug_range: list = _key("pair", None)  # not supported: a warning
    random_crop: bool = _key("bool")
    caption_prefix: str = _key("str")
    caption_suffix: str = _key("str")
    token_warmup_min: int = _key("int")
    token_warmup_step: float = _key("float")
    custom_attributes: dict = _key("table", None)
    resize_interpolation: str = _key("str", None)
    caption_dropout_rate: float = _key("float")
    caption_dropout_every_n_epochs: int = _key("int")
    caption_tag_dropout_rate: float = _key("float")
    # DreamBooth subset keys that may also be given higher up
    caption_extension: str = _key("str")
    class_tokens: str = _key("str", None)
    cache_info: bool = _key("bool", None)


@dataclass(frozen=True)
@_config_defaults
class SubsetOnlyKeys:
    """Keys only a [[datasets.subsets]] table may have."""

    image_dir: str = _key("str", None)
    is_reg: bool = _key("bool", False)
    alpha_mask: bool = _key("bool")
    metadata_file: str = _key("str", None)  # a fine-tuning subset: kohya's metadata JSON


def _kinds(*schemas) -> dict[str, str]:
    return {f.name: f.metadata["kind"] for schema in schemas for f in dataclasses.fields(schema)}


_DATASET_KEYS = _kinds(DatasetKeys)
_SUBSET_KEYS = _kinds(SubsetKeys)
_SUBSET_ONLY_KEYS = _kinds(SubsetOnlyKeys)
GENERAL_ALLOWED = {**_DATASET_KEYS, **_SUBSET_KEYS}
DATASET_ALLOWED = {**_DATASET_KEYS, **_SUBSET_KEYS, "subsets": "list"}
SUBSET_ALLOWED = {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}
# the TrainConfig setting that supplies a key when no table gives it, where its name differs
_CONFIG_NAME = {f.name: f.metadata["config"] for schema in (DatasetKeys, SubsetKeys, SubsetOnlyKeys)
                for f in dataclasses.fields(schema) if f.metadata["config"]}
# the value when neither a table nor the run's settings give one
_DEFAULTS = {f.name: f.default for schema in (DatasetKeys, SubsetKeys, SubsetOnlyKeys) for f in dataclasses.fields(schema)}
# DreamBooth keys that kohya refuses in a fine-tuning (metadata_file) subset and its dataset; [general] may hold them
DREAMBOOTH_ONLY_KEYS = ("is_reg", "class_tokens", "caption_extension", "cache_info")
_UNSUPPORTED_SUBSET_KEYS = {
    "conditioning_data_dir": "ControlNet datasets and conditioning-image masks are not supported; for masked_loss "
                             "use transparent images with alpha_mask = true",
}


# --------------------------------------------------------------------------- lookup and checks


class Lookup:
    """First non-None of subset -> dataset -> general -> config -> default, remembering where it came from."""

    def __init__(self, config: TrainConfig, levels: list[tuple[dict, str]]):
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


def setting_error(key: str, where: str | None, message: str) -> ConfigError:
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


def check_table(table: Any, allowed: dict[str, str], where: str, path: str) -> dict:
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


def load_dataset_config(path: str) -> dict:
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


def check_range(lookup: Lookup, key: str, low: float | None = None, high: float | None = None, hint: str = "") -> Any:
    value, where = lookup.get(key)
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise setting_error(key, where, f"{value!r} is not a number")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            span = f"between {low} and {high}"
        elif low is not None:
            span = f"at least {low}"
        else:
            span = f"at most {high}"
        raise setting_error(key, where, f"must be {span}, got {value}{hint}")
    return value


# --------------------------------------------------------------------------- settings and specs


# the settings of every dataset whose declared ranges the scan checks (it also runs without preflight)
DATASET_SETTINGS = ("train_batch_size", "prior_loss_weight", "vae_batch_size")


def check_dataset_settings(config: TrainConfig, problems: Problems | None = None) -> None:
    """Config-level checks that need no folders (also run by :func:`scan_dataset`): the declared ranges of
    ``DATASET_SETTINGS`` and the rules ``DATASET_RULES`` (cached latents with random_crop or color_aug). Recorded in
    ``problems``; without one, raised."""
    found = Problems() if problems is None else problems
    check_engine_values(config, found, DATASET_SETTINGS)
    check_rules(config, "engine", found, DATASET_RULES)
    if problems is None:
        found.raise_errors(one_as_is=True)


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


def _bucket_range(lookup: Lookup, resolution, res_where, enable_bucket: bool, steps, no_upscale: bool,
                  problems: Problems) -> tuple[Any, Any]:
    """(min_bucket_reso, max_bucket_reso), snapped to bucket_reso_steps with buckets on; problems with them and the
    resolution go to ``problems``."""
    min_reso, min_where = lookup.get("min_bucket_reso")
    max_reso, max_where = lookup.get("max_bucket_reso")
    if enable_bucket:
        if resolution is not None and steps is not None:
            w, h = resolution
            if w % steps or h % steps:
                problems.add(setting_error(
                    "resolution",
                    res_where,
                    f"{w},{h} is not a multiple of bucket_reso_steps ({steps}); use e.g. {max(steps, round(w / steps) * steps)}",
                ))
        if steps is not None:
            min_reso, max_reso = snap_bucket_range(int(min_reso), int(max_reso), steps)
            if min_reso <= 0:
                problems.add(setting_error("min_bucket_reso", min_where, f"must be at least bucket_reso_steps ({steps})"))
            elif min_reso > max_reso:
                problems.add(setting_error("min_bucket_reso", min_where, f"{min_reso} is larger than max_bucket_reso ({max_reso}); lower it"))
            elif not no_upscale and resolution is not None:
                w, h = resolution
                if min_reso > min(w, h):
                    problems.add(setting_error(
                        "min_bucket_reso", min_where, f"{min_reso} is larger than the resolution's short side ({min(w, h)}); lower it"
                    ))
                if max_reso < max(w, h):
                    problems.add(setting_error(
                        "max_bucket_reso", max_where, f"{max_reso} is smaller than the resolution's long side ({max(w, h)}); raise it"
                    ))
    elif resolution is not None and (resolution[0] % 8 or resolution[1] % 8):
        w, h = resolution
        problems.add(setting_error("resolution", res_where, f"{w},{h} is not a multiple of 8; use e.g. {round(w / 8) * 8}"))
    return min_reso, max_reso


def dataset_spec(lookup: Lookup) -> DatasetSpec:
    """A dataset's resolution, batch size, buckets, multiplier and validation split, every problem found at once."""
    problems = Problems()
    resolution, res_where = _resolution(lookup, problems)
    batch_size, batch_where = lookup.get("batch_size")
    if batch_where is not None:  # from the settings, train_batch_size is checked by check_dataset_settings
        with problems.collecting():  # a table's batch_size: train_batch_size's declared lower bound
            batch_size = check_range(lookup, "batch_size", declared_in_engine("train_batch_size").engine_range.low)
    enable_bucket = bool(lookup.value("enable_bucket"))
    steps = _bucket_reso_steps(lookup, problems)
    no_upscale = bool(lookup.value("bucket_no_upscale"))
    min_reso, max_reso = _bucket_range(lookup, resolution, res_where, enable_bucket, steps, no_upscale, problems)
    multiplier = None
    with problems.collecting():
        multiplier = check_range(lookup, "network_multiplier")
    split = _validation_split(lookup, problems)
    # validation_seed from a table is a whole number (its key's kind, checked by check_table); from the settings,
    # preflight checks its declared range
    val_seed = lookup.value("validation_seed")
    problems.raise_errors(one_as_is=True)
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


def _resolution(lookup: Lookup, problems: Problems) -> tuple[tuple[int, int] | None, str | None]:
    """(W, H) or None when it is missing or wrong, and where it was set."""
    res_value, res_where = lookup.get("resolution")
    if res_value is None:
        problems.error("resolution", "not set; give the training resolution, e.g. 512 or 512,768")
        return None, res_where
    try:
        return parse_resolution(res_value), res_where
    except ConfigError as e:
        problems.add(setting_error("resolution", res_where, str(e).split(": ", 1)[1]) if res_where else e)
        return None, res_where


def _bucket_reso_steps(lookup: Lookup, problems: Problems) -> int | None:
    """bucket_reso_steps, or None when it is wrong (recorded in ``problems``)."""
    _, steps_where = lookup.get("bucket_reso_steps")
    steps = None
    with problems.collecting():
        steps = check_range(lookup, "bucket_reso_steps", 8)
    if steps is not None and steps % 8 != 0:
        problems.add(setting_error("bucket_reso_steps", steps_where,
                                   f"{steps} is not a multiple of 8 (latents are 1/8 size); use 64"))
        return None
    return steps


def _validation_split(lookup: Lookup, problems: Problems) -> Any:
    """validation_split from a table, checked against its declared range (the message names where it was set);
    from the settings, preflight checks it."""
    split, split_where = lookup.get("validation_split")
    allowed = declared_in_engine("validation_split").engine_range
    if split_where is not None and not allowed.contains(split):
        problems.add(setting_error("validation_split", split_where,
                                   f"must be {allowed.wording()}, got {split!r}"))
        return None
    return split


def subset_spec(lookup: Lookup, image_dir: str, dataset: int, num_repeats: int | None, class_tokens: str | None,
                 is_reg: bool, metadata_file: str | None = None) -> SubsetSpec:
    if num_repeats is None:
        num_repeats, where = lookup.get("num_repeats")
        if where is not None:  # from the config: dataset_repeats, checked once by the scan (dataset_layout)
            num_repeats = check_range(lookup, "num_repeats", 1)
    ext, ext_where = lookup.get("caption_extension")
    if metadata_file:
        ext = ".txt"  # a fine-tuning subset reads no caption files
    elif not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
        raise setting_error("caption_extension", ext_where, f"{ext!r} must start with a dot, e.g. .txt")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        check_range(lookup, key, 0.0, 1.0)
    check_range(lookup, "caption_dropout_every_n_epochs", 0)
    check_range(lookup, "keep_tokens", 0)
    check_range(lookup, "token_warmup_min", 0)
    check_range(lookup, "token_warmup_step", 0)
    interp, interp_where = lookup.get("resize_interpolation")
    if interp is not None and str(interp).lower() not in RESIZE_INTERPOLATIONS:
        raise setting_error("resize_interpolation", interp_where, f"{interp!r} is not one of {', '.join(RESIZE_INTERPOLATIONS)}")
    sep = lookup.value("caption_separator") or ","
    keep_sep, keep_sep_where = lookup.get("keep_tokens_separator")
    if keep_sep and keep_sep.strip() == sep.strip():
        raise setting_error("keep_tokens_separator", keep_sep_where, f"{keep_sep!r} is the caption_separator too, so "
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
