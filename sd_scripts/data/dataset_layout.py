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
(:mod:`.validation`; listed in ``plan.validation_images``, never trained on) and returns the plan. Warnings are
returned in ``plan.warnings``. It never writes.

The parts: the plan's types in :mod:`.dataset_plan`, the dataset_config schema and the settings lookup in
:mod:`.dataset_schema`, folders, captions and image checks in :mod:`.dataset_scan`; this module puts them together
(the three layouts, then the totals, regularization balance and held-out images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, DatasetError, UserError
from sd_scripts.core.problems import Problems
from sd_scripts.data.captions import count_tags
from sd_scripts.data.dataset_plan import DatasetPlan, DatasetSpec, ImageRecord, Placement, SubsetSpec, place_in_buckets
from sd_scripts.data.dataset_scan import (
    EXAMPLE,
    MAX_LISTED,
    PendingImage,
    check_root,
    dreambooth_folders,
    listing,
    parse_folder_name,
    probe_all,
    scan_subset,
)
from sd_scripts.data.dataset_schema import (
    DATASET_ALLOWED,
    DREAMBOOTH_ONLY_KEYS,
    GENERAL_ALLOWED,
    SUBSET_ALLOWED,
    Lookup,
    check_dataset_settings,
    check_table,
    dataset_spec,
    load_dataset_config,
    parse_resolution,
    subset_spec,
)
from sd_scripts.data.held_out import split_held_out

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


# --------------------------------------------------------------------------- the scan's state


@dataclass
class _ScanState:
    """What the scan has found so far. Independent problems collect in ``problems`` (all reported together);
    a problem that makes the rest meaningless raises."""

    config: TrainConfig
    problems: Problems = field(default_factory=Problems)
    datasets: list[DatasetSpec | None] = field(default_factory=list)
    subsets: list[SubsetSpec] = field(default_factory=list)
    subset_setting: list[str] = field(default_factory=list)  # the setting named in messages about each subset
    roots: list[str] = field(default_factory=list)  # folders the images come from (never written into)
    pending: list[PendingImage] = field(default_factory=list)  # images with captions, not yet decoded
    dataset_config: str | None = None

    def attempt(self, fn: Callable, *args):
        """``fn(*args)``, or None with its UserError kept in ``problems``."""
        try:
            return fn(*args)
        except UserError as e:
            self.problems.add(e)
            return None

    def add_subset(self, subset: SubsetSpec | None, setting: str, root: str | None = None) -> None:
        if subset is None:
            return
        self.subsets.append(subset)
        self.subset_setting.append(setting)
        if root is not None:
            self.roots.append(root)


def scan_dataset(config: TrainConfig, progress: Callable[[int, int], None] | None = None) -> DatasetPlan:
    """Check the dataset settings and folders and return the :class:`DatasetPlan`.

    Raises ``ConfigError`` / ``DatasetError`` (one line naming the setting and the fix) for one
    problem, or :class:`UserErrors` holding every independent problem found when there are several.
    ``progress(done, total)`` is called as each image has been checked.
    """
    state = _ScanState(config)
    check_dataset_settings(config, state.problems)
    with state.problems.collecting():  # a problem that makes the remaining checks meaningless
        _collect_layout(state)
    state.problems.raise_errors(one_as_is=True)
    return _finish_scan(state, progress)


def _collect_layout(state: _ScanState) -> None:
    """Settings, folders and captions."""
    config = state.config
    if config.caption_extention:
        state.problems.warn("caption_extention is kohya's old misspelling; it still works, but write caption_extension")
    state.dataset_config = config.dataset_config
    in_json = config.in_json
    repeats = config.dataset_repeats
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        state.problems.error("dataset_repeats", f"must be a whole number of at least 1, got {repeats!r}")
    if state.dataset_config:
        _collect_dataset_config(state)
    elif in_json:
        _collect_in_json(state, in_json)
    else:
        _collect_folders(state)
    _check_subset_settings(state)
    _collect_captions(state)


# --------------------------------------------------------------------------- the three layouts


@dataclass
class _TomlDataset:
    """One [[datasets]] table of a dataset_config being read."""

    index: int
    table: dict
    where: str  # "[[datasets]] #N", in messages
    general: dict
    path: str  # the dataset_config file
    base_dir: str  # its folder: relative image_dir and metadata_file paths may start there
    seen: set[str] = field(default_factory=set)  # folders (or metadata files) already read

    def lookup(self, config: TrainConfig, sub: dict, where: str) -> Lookup:
        return Lookup(config, [(sub, f"dataset_config {where}"), (self.table, f"dataset_config {self.where}"),
                               (self.general, "dataset_config [general]")])


def _collect_dataset_config(state: _ScanState) -> None:
    config, path = state.config, state.dataset_config
    given = {"train_data_dir": config.train_data_dir, "reg_data_dir": config.reg_data_dir, "in_json": config.in_json}
    ignored = [k for k, value in given.items() if value]
    if ignored:
        state.problems.warn(f"{'/'.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored because "
                              f"dataset_config is given")
    doc = load_dataset_config(path)
    general = check_table(doc.get("general", {}), GENERAL_ALLOWED, "[general]", path)
    ds_tables = doc.get("datasets", [])
    if not isinstance(ds_tables, list) or not ds_tables:
        raise ConfigError(
            f"dataset_config: '{path}' has no [[datasets]]; add [[datasets]] with [[datasets.subsets]] image_dir = \"...\"",
            "dataset_config",
        )
    base_dir = os.path.dirname(os.path.abspath(path))
    for d, ds_table in enumerate(ds_tables):
        _collect_toml_dataset(state, _TomlDataset(d, ds_table, f"[[datasets]] #{d + 1}", general, path, base_dir))


def _collect_toml_dataset(state: _ScanState, ds: _TomlDataset) -> None:
    check_table(ds.table, DATASET_ALLOWED, ds.where, ds.path)
    ds_lookup = Lookup(state.config, [(ds.table, f"dataset_config {ds.where}"), (ds.general, "dataset_config [general]")])
    state.datasets.append(state.attempt(dataset_spec, ds_lookup))
    sub_tables = ds.table.get("subsets", [])
    if not sub_tables:
        state.problems.add(ConfigError(
            f"dataset_config: {ds.where} of '{ds.path}' has no [[datasets.subsets]]; add one with image_dir = \"...\"",
            "dataset_config",
        ))
        return
    finetune = state.attempt(_finetune_dataset, ds.table, sub_tables, ds.where, ds.path)
    if finetune is None:
        return
    for s, sub in enumerate(sub_tables):
        where = f"{ds.where} subset #{s + 1}"
        check_table(sub, SUBSET_ALLOWED, where, ds.path)
        if sub.get("face_crop_aug_range") is not None or ds.table.get("face_crop_aug_range") is not None:
            state.problems.warn(f"dataset_config: face_crop_aug_range in {where} is not supported and is ignored")
        if finetune:
            subset = state.attempt(_toml_finetune_subset, state, ds, sub, where)
            state.add_subset(subset, "dataset_config", subset.image_dir if subset is not None else None)
        else:
            _collect_toml_dreambooth_subset(state, ds, sub, where)


def _collect_toml_dreambooth_subset(state: _ScanState, ds: _TomlDataset, sub: dict, where: str) -> None:
    image_dir = sub.get("image_dir")
    if not image_dir:
        state.problems.add(ConfigError(
            f"dataset_config: {where} of '{ds.path}' has no image_dir; add image_dir = \"path/to/images\"",
            "dataset_config",
        ))
        return
    resolved = image_dir
    if not os.path.isabs(image_dir) and not os.path.isdir(image_dir):
        candidate = os.path.join(ds.base_dir, image_dir)
        if os.path.isdir(candidate):
            resolved = candidate
    if not os.path.exists(resolved):
        state.problems.add(DatasetError(f"dataset_config: image_dir '{image_dir}' ({where}) does not exist; check the path", "dataset_config"))
        return
    if not os.path.isdir(resolved):
        state.problems.add(DatasetError(f"dataset_config: image_dir '{image_dir}' ({where}) is not a folder; give the folder of images", "dataset_config"))
        return
    key = os.path.realpath(resolved)
    if key in ds.seen:
        state.problems.warn(f"dataset_config: image_dir '{image_dir}' appears twice in {ds.where}; the second one is ignored")
        return
    ds.seen.add(key)
    lookup = ds.lookup(state.config, sub, where)
    class_tokens = lookup.value("class_tokens")
    subset = state.attempt(subset_spec, lookup, resolved, ds.index, None, class_tokens, bool(sub.get("is_reg", False)))
    state.add_subset(subset, "dataset_config", resolved)


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
            for key in DREAMBOOTH_ONLY_KEYS:
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


def _toml_finetune_subset(state: _ScanState, ds: _TomlDataset, sub: dict, where: str) -> SubsetSpec | None:
    """A ``metadata_file`` subset of a dataset_config (kohya's fine-tuning subset); None for a duplicate."""
    metadata_file = _resolve_near(sub["metadata_file"], ds.base_dir)
    if not os.path.isfile(metadata_file):
        problem = "is a folder" if os.path.isdir(metadata_file) else "does not exist"
        raise DatasetError(f"dataset_config metadata_file: '{sub['metadata_file']}' ({where}) {problem}; give kohya's "
                           f"metadata .json file", "dataset_config")
    image_dir = sub.get("image_dir")
    if image_dir:
        image_dir = _resolve_near(image_dir, ds.base_dir)
        _check_image_folder(image_dir, f"dataset_config image_dir ({where})")
    else:
        image_dir = os.path.dirname(os.path.abspath(metadata_file))
    key = f"{os.path.realpath(metadata_file)}|{os.path.realpath(image_dir)}"
    if key in ds.seen:
        state.problems.warn(f"dataset_config: metadata_file '{sub['metadata_file']}' appears twice in {ds.where}; "
                              f"the second one is ignored")
        return None
    ds.seen.add(key)
    return subset_spec(ds.lookup(state.config, sub, where), image_dir, ds.index, None, None, False, metadata_file)


def _collect_in_json(state: _ScanState, in_json: str) -> None:
    config = state.config
    lookup = Lookup(config, [])
    state.datasets.append(state.attempt(dataset_spec, lookup))
    if config.reg_data_dir:
        state.problems.warn("reg_data_dir is ignored with in_json: fine-tuning datasets have no regularization images")
    image_dir = config.train_data_dir
    if image_dir:
        _check_image_folder(image_dir, "train_data_dir")
    else:  # kohya needs the keys to be paths then; the metadata's own folder is searched too
        image_dir = os.path.dirname(os.path.abspath(in_json))
    subset = state.attempt(subset_spec, lookup, image_dir, 0, None, None, False, in_json)
    state.add_subset(subset, "in_json", image_dir)


def _collect_folders(state: _ScanState) -> None:
    config = state.config
    lookup = Lookup(config, [])
    state.datasets.append(state.attempt(dataset_spec, lookup))
    root = check_root(config.train_data_dir, "train_data_dir")
    state.roots.append(root)
    for path, repeats, tokens in state.attempt(dreambooth_folders, root, "train_data_dir", state.problems) or []:
        state.add_subset(state.attempt(subset_spec, lookup, path, 0, repeats, tokens, False), "train_data_dir")
    reg_root = config.reg_data_dir
    if reg_root and state.attempt(check_root, reg_root, "reg_data_dir") is not None:
        state.roots.append(reg_root)
        for path, repeats, tokens in state.attempt(dreambooth_folders, reg_root, "reg_data_dir", state.problems) or []:
            state.add_subset(state.attempt(subset_spec, lookup, path, 0, repeats, tokens, True), "reg_data_dir")


def _check_subset_settings(state: _ScanState) -> None:
    """Settings that clash with a subset's own: masked_loss without alpha masks, cached latents with augmentation."""
    config, subsets = state.config, state.subsets
    if config.masked_loss and subsets and not any(sub.alpha_mask for sub in subsets):
        state.problems.add(ConfigError(
            "masked_loss: the masks come from the images' alpha channels here, and no subset has alpha_mask; "
            "set alpha_mask (or alpha_mask = true in the dataset_config subsets), or turn masked_loss off",
            "masked_loss",
        ))
    if config.cache_latents or config.cache_latents_to_disk:
        for i, sub in enumerate(subsets):
            for key, in_subset, globally in (("color_aug", sub.color_aug, config.color_aug),
                                             ("random_crop", sub.random_crop, config.random_crop)):
                if in_subset and not globally:  # set globally: reported already
                    state.problems.add(ConfigError(
                        f"cache_latents and {key} (set for '{sub.name}' in {state.subset_setting[i]}) cannot be used together: "
                        f"cached latents cannot change every step; turn off {key} or cache_latents",
                        "cache_latents",
                    ))


def _collect_captions(state: _ScanState) -> None:
    """Each subset's images and captions (every unreadable caption file is reported, the list capped)."""
    unreadable = Problems()
    for i, sub in enumerate(state.subsets):
        with state.problems.collecting():
            state.pending.extend(scan_subset(sub, i, state.subset_setting[i], state.problems, unreadable, state.roots))
    state.problems.extend(unreadable.errors[:MAX_LISTED])
    if len(unreadable.errors) > MAX_LISTED:
        more = len(unreadable.errors) - MAX_LISTED
        setting = unreadable.errors[MAX_LISTED].setting
        state.problems.error(setting, f"and {more} more caption file(s) that cannot be read; open them and save them "
                             "as UTF-8", DatasetError)


# --------------------------------------------------------------------------- from images to the plan


@dataclass
class _Totals:
    """The images each dataset trains on, after the held-out split and regularization balance, and the tables
    the metadata records."""

    images: list[ImageRecord] = field(default_factory=list)
    held_out: list[ImageRecord] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)  # folders too small to hold an image out
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency_cased: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)


def _finish_scan(state: _ScanState, progress) -> DatasetPlan:
    """Decode every image once and build the plan (settings, folders and captions are known good)."""
    per_subset, skipped = _usable_images(state, progress)
    _warn_small_images(state, per_subset)
    totals = _Totals()
    for d, spec in enumerate(state.datasets):
        _add_dataset(state, totals, d, spec, per_subset)
    _check_held_out(state, totals)
    _require_training_images(state, totals, skipped)
    config, datasets = state.config, state.datasets
    plan = DatasetPlan(
        datasets=datasets,
        subsets=state.subsets,
        images=totals.images,
        skipped=skipped,
        warnings=list(dict.fromkeys(state.problems.warnings)),
        num_train_images=sum(s.num_train_images for s in datasets),
        num_reg_images=sum(s.num_reg_images for s in datasets),
        num_validation_images=len(totals.held_out),
        validation_images=totals.held_out,
        tag_frequency=totals.tag_frequency,
        tag_frequency_cased=totals.tag_frequency_cased,
        dataset_dirs=totals.dataset_dirs,
        reg_dataset_dirs=totals.reg_dataset_dirs,
        from_dataset_config=bool(state.dataset_config),
        roots=[os.path.abspath(r) for r in state.roots],
    )
    if config.cache_latents_to_disk:
        from sd_scripts.data.latent_cache import resolve_cache_dir

        resolve_cache_dir(config, plan)
    return plan


def _usable_images(state: _ScanState, progress) -> tuple[dict[int, list[ImageRecord]], list[tuple[str, str]]]:
    """Every pending image decoded once: the usable ones per subset, and (path, reason) of the skipped ones."""
    probed = probe_all([p.path for p in state.pending], progress)
    skipped: list[tuple[str, str]] = []
    skipped_seen: set[tuple[str, str]] = set()

    def skip(path: str, reason: str) -> None:
        if (path, reason) not in skipped_seen:
            skipped_seen.add((path, reason))
            skipped.append((path, reason))

    per_subset: dict[int, list[ImageRecord]] = {i: [] for i in range(len(state.subsets))}
    for p in state.pending:
        result = probed[p.path]
        if isinstance(result, str):
            skip(p.path, result)
            continue
        sub = state.subsets[p.subset]
        spec = state.datasets[sub.dataset]
        if spec.enable_bucket and spec.bucket_no_upscale and min(result) < spec.bucket_reso_steps:
            skip(p.path, f"{result[0]}x{result[1]} is smaller than bucket_reso_steps ({spec.bucket_reso_steps}) and bucket_no_upscale is on")
            continue
        per_subset[p.subset].append(ImageRecord(
            path=p.path, caption=p.caption, subset=p.subset, dataset=sub.dataset, is_reg=sub.is_reg,
            repeats=sub.num_repeats, size=result, caption_source=p.caption_source, tags=p.tags,
        ))
    if skipped:
        listed = "; ".join(f"'{path}' ({reason})" for path, reason in skipped[:MAX_LISTED])
        more = f"; and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
        state.problems.warn(f"skipped {len(skipped)} image(s) that cannot be used: {listed}{more}")
    return per_subset, skipped


def _warn_small_images(state: _ScanState, per_subset: dict[int, list[ImageRecord]]) -> None:
    tiny = []
    for i, records in per_subset.items():
        res = state.datasets[state.subsets[i].dataset].resolution
        for r in records:
            if max(r.size) * 2 < min(res):
                tiny.append(f"{os.path.basename(r.path)} ({r.size[0]}x{r.size[1]})")
    if tiny:
        state.problems.warn(f"{len(tiny)} image(s) are less than half the training resolution and will be blurry "
                              f"when upscaled: {listing(tiny)}")


def _add_dataset(state: _ScanState, totals: _Totals, d: int, spec: DatasetSpec,
                 per_subset: dict[int, list[ImageRecord]]) -> None:
    """Dataset ``d``'s subsets: held-out images, counts, tag frequencies, folder tables, then its training images
    and its regularization images balanced 1:1 with them."""
    train_records, reg_records = [], []
    for i, sub in enumerate(state.subsets):
        if sub.dataset != d:
            continue
        records = per_subset[i]
        if spec.validation_split and not sub.is_reg and records:
            records, held = split_held_out(records, spec.validation_split, spec.validation_seed, f"{d}/{sub.name}")
            if not held:
                totals.too_small.append(f"{sub.name} ({len(records)})")
            totals.held_out.extend(held)
            spec.num_validation_images += len(held)
        sub.img_count = len(records)
        # kohya counts a fine-tuning entry's "tags", not its caption
        captions = [r.tags for r in records if r.tags] if sub.metadata_file else [r.caption for r in records]
        freq = count_tags(captions, into=spec.tag_frequency.setdefault(sub.name, {}))
        if sub.name not in totals.tag_frequency:
            totals.tag_frequency[sub.name] = freq
            totals.tag_frequency_cased[sub.name] = count_tags(captions, lowercase=False)
        table = totals.reg_dataset_dirs if sub.is_reg else totals.dataset_dirs
        if records or not sub.is_reg:
            table[_unique_key(table, sub.name)] = {"n_repeats": sub.num_repeats, "img_count": sub.img_count}
        if sub.is_reg:
            reg_records.extend(records)
            spec.num_reg_images += sub.num_repeats * len(records)
        else:
            train_records.extend(records)
            spec.num_train_images += sub.num_repeats * len(records)
    totals.images.extend(train_records)
    if reg_records:
        used = _balance_reg(reg_records, spec.num_train_images)
        if len(used) < len(reg_records):
            state.problems.warn(
                f"{len(reg_records) - len(used)} of {len(reg_records)} regularization images are not used "
                f"(there are more than training images x repeats)"
            )
        totals.images.extend(used)


def _check_held_out(state: _ScanState, totals: _Totals) -> None:
    too_small, held_out = totals.too_small, totals.held_out
    if too_small:
        state.problems.warn(f"validation_split: {len(too_small)} folder(s) have too few images to hold one out, so "
                              f"all their images are trained on: {listing(too_small)}")
    if too_small and not held_out:
        state.problems.warn("validation_split: no image is held out, so no validation loss is computed; raise "
                              "validation_split or add images")
    elif not held_out and (state.config.validate_every_n_steps or state.config.validate_every_n_epochs
                           or state.config.max_validation_steps):
        state.problems.warn("validate_every_n_steps/validate_every_n_epochs/max_validation_steps are set but "
                              "validation_split is 0, so no validation loss is computed; set validation_split, e.g. 0.1")
    if held_out and not any(not r.is_reg for r in totals.images):
        raise DatasetError("validation_split: holding images out leaves no training image; lower validation_split",
                           "validation_split")


def _require_training_images(state: _ScanState, totals: _Totals, skipped: list[tuple[str, str]]) -> None:
    """A dataset without one training image stops here, with the likeliest reason."""
    if any(not r.is_reg for r in totals.images):
        return
    subsets, subset_setting = state.subsets, state.subset_setting
    if skipped:
        raise DatasetError(
            f"{subset_setting[0] if subset_setting else 'train_data_dir'}: none of the images can be used "
            f"({len(skipped)} skipped, e.g. '{skipped[0][0]}': {skipped[0][1]}); replace or re-save them",
            subset_setting[0] if subset_setting else "train_data_dir",
        )
    if subsets and all(sub.metadata_file for sub in subsets):
        setting = subset_setting[0]
        files = listing(list(dict.fromkeys(sub.metadata_file for sub in subsets)))
        raise DatasetError(
            f"{'in_json' if setting == 'in_json' else 'dataset_config metadata_file'}: no usable image entries in "
            f"{files}; add entries {{\"<image name>\": {{\"caption\": \"...\"}}}} whose images are in the "
            f"image folder",
            setting,
        )
    dataset_config = state.dataset_config
    setting = "dataset_config" if dataset_config else "train_data_dir"
    place = f"'{dataset_config}'" if dataset_config else f"'{state.config.train_data_dir}'"
    raise DatasetError(
        f"{setting}: no training images found in the folders of {place}; "
        f"put .png/.jpg/.jpeg/.webp/.bmp images in <repeats>_<name> subfolders ({EXAMPLE})",
        setting,
    )


def _unique_key(table: dict, key: str) -> str:
    if key not in table:
        return key
    i = 2
    while f"{key} ({i})" in table:
        i += 1
    return f"{key} ({i})"


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
