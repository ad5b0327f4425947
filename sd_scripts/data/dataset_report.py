"""A look at a dataset before training: counts, problems, caption lengths, tags and buckets.

:func:`build_report` takes the engine's ``TrainConfig`` (the same settings a training reads) and returns a
:class:`DatasetReport`; nothing is written. It runs the training's own dataset scan (``scan_dataset``: the
folders, captions and a decode of every image) and the training's own bucket placement
(:func:`~.dataset_layout.place_in_buckets`, which ``TrainDataset`` uses), then adds what a training does
not check:

* captions without an image (caption files whose image is missing), per subset folder;
* images smaller than the training resolution (fewer pixels than ``resolution``), with the factor their
  bucket enlarges them by;
* near-duplicate images: a 64-bit perceptual hash (``imagehash.phash``) of each image; pairs whose hashes
  differ in at most ``duplicate_distance`` bits are listed (0 = identical pictures; resized or recompressed
  copies are usually within 4, unrelated pictures around 32);
* caption length in CLIP tokens, the caption as trained (prefix and suffix added, first line), against 75,
  150 and 225 (``max_token_length``), counted with the CLIP tokenizer when one is given (see
  :mod:`.caption_tokens`) and estimated otherwise;
* tag frequency (kohya's count: split on ",", lower-cased).

:func:`~.report_picture.save_report_picture` draws it as a PNG.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from sd_scripts.core.config import TrainConfig
from sd_scripts.data.captions import count_tags
from sd_scripts.data.dataset_layout import DatasetPlan, place_in_buckets, scan_dataset
from sd_scripts.data.images import IMAGE_EXTENSIONS, is_hidden_name

from .caption_tokens import TOKEN_LIMITS, TokenCounter, caption_as_trained
from .near_duplicates import near_duplicate_pairs, perceptual_hashes

__all__ = ["ImageEntry", "SubsetSummary", "DatasetReport", "build_report", "PROBLEMS"]

Size = tuple[int, int]

# problem key -> the short mark drawn on a thumbnail and the line of the legend
PROBLEMS = {
    "no_caption": ("NO CAPTION", "no caption file (trains with the folder's class tokens or an empty caption)"),
    "small": ("SMALL", "fewer pixels than the training resolution: enlarged, so it may look blurry"),
    "duplicate": ("DUPLICATE", "a near-duplicate of another image"),
    "long_caption": ("LONG", "caption longer than max_token_length: the end is cut off"),
}
_SHOWN = 8  # paths listed per problem in the text summary


@dataclass
class ImageEntry:
    """One usable image: where it trains (its bucket) and what is wrong with it."""

    path: str
    subset: int
    dataset: int
    size: Size
    bucket: Size
    resized: Size
    repeats: int
    caption: str
    caption_source: str  # "file" | "metadata" | "class_tokens" | "none" (the scan's)
    tokens: int
    problems: list[str] = field(default_factory=list)

    @property
    def upscale(self) -> float:
        """How much the image is enlarged to cover its bucket (1.0 or less: not enlarged)."""
        return self.resized[0] / self.size[0]


@dataclass
class SubsetSummary:
    name: str
    folder: str
    is_reg: bool
    repeats: int
    images: int
    captioned: int


@dataclass
class DatasetReport:
    """Everything :func:`build_report` found (see the module docstring)."""

    root: str
    settings: list[str]
    subsets: list[SubsetSummary]
    images: list[ImageEntry]
    buckets: list[dict[Size, list[ImageEntry]]]  # per dataset, sorted by bucket
    batch_sizes: list[int]
    gradient_accumulation: int
    unreadable: list[tuple[str, str]]
    captions_without_images: list[str]
    duplicates: list[tuple[str, str, int]]
    duplicate_distance: int
    token_limit: int
    tokens_exact: bool
    tag_counts: dict[str, int]
    min_area: int
    held_out: int = 0  # images kept for the validation loss (validation_split), never trained on
    warnings: list[str] = field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one epoch, as the training dataset makes them: per dataset and bucket, images x repeats
        split into batches (a batch never mixes buckets)."""
        total = 0
        for per_bucket, batch_size in zip(self.buckets, self.batch_sizes):
            total += sum(math.ceil(sum(e.repeats for e in entries) / batch_size) for entries in per_bucket.values())
        return total

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of one epoch on one GPU (batches / gradient accumulation)."""
        return math.ceil(self.batches_per_epoch / max(1, self.gradient_accumulation))

    def with_problem(self, key: str) -> list[ImageEntry]:
        return [e for e in self.images if key in e.problems]

    def problem_count(self) -> int:
        return (sum(1 for e in self.images if e.problems) + len(self.unreadable) + len(self.captions_without_images))

    def lines(self) -> list[str]:
        """The text summary."""
        out = [f"Dataset report: {self.root}", "Settings: " + "; ".join(self.settings), ""]
        for s in self.subsets:
            kind = "regularization " if s.is_reg else ""
            out.append(f"{kind}subset {s.name}: {s.images} images x {s.repeats} repeats, {s.captioned} captioned")
        train = [e for e in self.images if not self._is_reg(e)]
        if self.held_out:
            out.append(f"{self.held_out} images held out for the validation loss (validation_split), not trained on")
        out.append(f"{len(train)} training images, {sum(e.repeats for e in train)} per epoch with repeats; "
                   f"{self.batches_per_epoch} batches = {self.steps_per_epoch} steps per epoch"
                   + (f" (gradient accumulation {self.gradient_accumulation})" if self.gradient_accumulation > 1 else ""))
        out += ["", "Buckets (width x height: images, with repeats):"]
        for d, per_bucket in enumerate(self.buckets):
            if len(self.buckets) > 1:
                out.append(f"  dataset {d + 1} (batch size {self.batch_sizes[d]}):")
            for bucket, entries in per_bucket.items():
                out.append(f"  {bucket[0]}x{bucket[1]}: {len(entries)} images, {sum(e.repeats for e in entries)}")
        out += ["", "Problems:"]
        found = False
        for key, (mark, text) in PROBLEMS.items():
            entries = self.with_problem(key)
            if not entries:
                continue
            found = True
            out.append(f"  {len(entries)} {mark.lower()}: {text}")
            for e in entries[:_SHOWN]:
                out.append(f"    {self._rel(e.path)}{self._detail(key, e)}")
            if len(entries) > _SHOWN:
                out.append(f"    and {len(entries) - _SHOWN} more")
        if self.duplicates:
            out.append(f"  near-duplicate pairs (hash distance at most {self.duplicate_distance} of 64 bits):")
            for a, b, dist in self.duplicates[:_SHOWN * 2]:
                out.append(f"    {self._rel(a)} ~ {self._rel(b)} (distance {dist})")
            if len(self.duplicates) > _SHOWN * 2:
                out.append(f"    and {len(self.duplicates) - _SHOWN * 2} more pairs")
        for title, paths in (("unreadable images (not trained on)", [f"{self._rel(p)}: {r}" for p, r in self.unreadable]),
                             ("captions without an image", [self._rel(p) for p in self.captions_without_images])):
            if paths:
                found = True
                out.append(f"  {len(paths)} {title}:")
                out += [f"    {p}" for p in paths[:_SHOWN]]
                if len(paths) > _SHOWN:
                    out.append(f"    and {len(paths) - _SHOWN} more")
        if not found:
            out.append("  none found")
        out += ["", self._token_line()]
        if self.tag_counts:
            top = sorted(self.tag_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
            out += ["", f"Tags ({len(self.tag_counts)} different; the most frequent):",
                    "  " + ", ".join(f"{tag} ({n})" for tag, n in top)]
        if self.warnings:
            out += [""] + [f"warning: {w}" for w in self.warnings]
        return out

    def _token_line(self) -> str:
        counts = [e.tokens for e in self.images]
        bands, low = [], 0
        for limit in TOKEN_LIMITS:
            bands.append(f"{low + 1 if low else 0}-{limit}: {sum(1 for n in counts if low < n <= limit or (low == 0 and n == 0))}")
            low = limit
        bands.append(f"over {TOKEN_LIMITS[-1]}: {sum(1 for n in counts if n > TOKEN_LIMITS[-1])}")
        how = "counted with the CLIP tokenizer" if self.tokens_exact else (
            "estimated: no CLIP tokenizer found offline, set tokenizer_cache_dir for exact counts")
        longest = max(counts, default=0)
        return (f"Caption length in CLIP tokens ({how}): " + ", ".join(bands)
                + f"; longest {longest}; max_token_length {self.token_limit}")

    def _detail(self, key: str, e: ImageEntry) -> str:
        if key == "small":
            return f" ({e.size[0]}x{e.size[1]}, enlarged x{e.upscale:.2g})" if e.upscale > 1 else f" ({e.size[0]}x{e.size[1]})"
        if key == "long_caption":
            return f" ({e.tokens} tokens)"
        return ""

    def _rel(self, path: str) -> str:
        try:
            rel = os.path.relpath(path, self.root)
        except ValueError:  # another drive (Windows)
            return path
        return path if rel.startswith("..") else rel

    def _is_reg(self, entry: ImageEntry) -> bool:
        return self.subsets[entry.subset].is_reg


# --------------------------------------------------------------------------------------------- building


def _settings_text(plan: DatasetPlan, config: TrainConfig, token_limit: int) -> list[str]:
    out = []
    for d, spec in enumerate(plan.datasets):
        w, h = spec.resolution
        text = f"resolution {w}x{h}" if w != h else f"resolution {w}"
        if spec.enable_bucket:
            text += (f", buckets {spec.min_bucket_reso}-{spec.max_bucket_reso} in steps of {spec.bucket_reso_steps}"
                     + (", no upscale" if spec.bucket_no_upscale else ""))
        else:
            text += ", no buckets (every image cropped to the resolution)"
        text += f", batch size {spec.batch_size}"
        out.append((f"dataset {d + 1}: " if len(plan.datasets) > 1 else "") + text)
    out.append(f"caption extension {config.caption_extension}")
    out.append(f"max_token_length {token_limit}")
    return out


def _captions_without_images(plan: DatasetPlan) -> list[str]:
    """Caption files (the subset's caption extension) in the image folders with no image of the same name."""
    found = []
    for subset in plan.subsets:
        if subset.metadata_file or not os.path.isdir(subset.image_dir):
            continue
        ext = subset.caption_extension.lower()
        try:
            names = sorted(n for n in os.listdir(subset.image_dir) if not is_hidden_name(n))
        except OSError:
            continue
        stems = {os.path.splitext(n)[0].lower() for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS}
        for name in names:
            if name.lower().endswith(ext) and name[: len(name) - len(ext)].lower() not in stems:
                path = os.path.join(subset.image_dir, name)
                if os.path.isfile(path):
                    found.append(path)
    return found


def build_report(config: TrainConfig, *, tokenizer: Any = None, duplicate_distance: int = 4,
                 progress: Callable[[str, int, int], None] | None = None) -> DatasetReport:
    """The report of the dataset ``config`` describes (see the module docstring).

    ``tokenizer``: a CLIP tokenizer for exact token counts (None: estimated). ``progress(stage, done, total)``
    is called while the images are checked ("scan") and hashed ("hash"). Raises the scan's one-line
    ``UserError`` when the dataset cannot train (no images, a missing folder, unreadable captions...)."""
    plan = scan_dataset(config, None if progress is None else (lambda done, total: progress("scan", done, total)))
    token_limit = int(config.max_token_length or TOKEN_LIMITS[0])
    counter = TokenCounter(tokenizer, weighted=bool(config.weighted_captions))

    entries: list[ImageEntry] = []
    buckets: list[dict[Size, list[ImageEntry]]] = []
    for manager, placements in place_in_buckets(plan):
        per_bucket: dict[Size, list[ImageEntry]] = {}
        for p in placements:
            record = p.record
            caption = caption_as_trained(record.caption, plan.subsets[record.subset].captions)
            entry = ImageEntry(record.path, record.subset, record.dataset, tuple(record.size), tuple(p.bucket),
                               tuple(p.resized), record.repeats, caption, record.caption_source,
                               counter.count(caption))
            entries.append(entry)
            per_bucket.setdefault(entry.bucket, []).append(entry)
        buckets.append(dict(sorted(per_bucket.items())))

    areas = [spec.resolution[0] * spec.resolution[1] for spec in plan.datasets]
    for e in entries:
        if e.caption_source not in ("file", "metadata"):
            e.problems.append("no_caption")
        if e.size[0] * e.size[1] < areas[e.dataset]:
            e.problems.append("small")
        if e.tokens > token_limit:
            e.problems.append("long_caption")

    hashes = perceptual_hashes([e.path for e in entries],
                               None if progress is None else (lambda done, total: progress("hash", done, total)))
    pairs = near_duplicate_pairs(hashes, duplicate_distance)
    for i, j, _ in pairs:
        for k in (i, j):
            if "duplicate" not in entries[k].problems:
                entries[k].problems.append("duplicate")

    captioned: dict[int, int] = {}
    for record in plan.images:
        if record.caption_source in ("file", "metadata"):
            captioned[record.subset] = captioned.get(record.subset, 0) + 1
    subsets = [SubsetSummary(os.path.basename(os.path.normpath(s.image_dir)), s.image_dir, s.is_reg, s.num_repeats,
                             s.img_count, captioned.get(i, 0)) for i, s in enumerate(plan.subsets)]
    tags: dict[str, int] = {}
    count_tags((e.caption for e in entries if "no_caption" not in e.problems), into=tags)
    root = plan.roots[0] if plan.roots else ""
    return DatasetReport(
        root=root, settings=_settings_text(plan, config, token_limit), subsets=subsets, images=entries,
        buckets=buckets, batch_sizes=[spec.batch_size for spec in plan.datasets],
        gradient_accumulation=int(config.gradient_accumulation_steps or 1),
        unreadable=list(plan.skipped), captions_without_images=_captions_without_images(plan),
        duplicates=[(entries[i].path, entries[j].path, d) for i, j, d in pairs], duplicate_distance=duplicate_distance,
        token_limit=token_limit, tokens_exact=counter.exact, tag_counts=tags,
        min_area=min(areas) if areas else 0, held_out=len(plan.validation_images), warnings=list(plan.warnings))
