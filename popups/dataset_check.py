"""What the wizard says about a dataset: the ``<n>_<name>`` folders, images, captions and steps.

:func:`check_dataset` runs the engine's own dataset scan (``scan_dataset``, the preflight check:
no model, no torch), which decodes every image once. The wizard scans again only when the folders
or the caption extension change; :func:`estimate_steps` places the scanned image sizes in buckets
for the current resolution, bucket settings and batch size, as the training dataset does, so the
steps shown are the ones the run will take on one GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["FolderCount", "DatasetReport", "check_dataset", "estimate_steps", "scan_key", "has_transparent_images",
           "make_report_picture", "open_with_viewer"]


@dataclass
class FolderCount:
    name: str
    repeats: int
    images: int
    captions: int
    is_reg: bool = False


@dataclass
class DatasetReport:
    folders: list[FolderCount]
    num_train_images: int  # images x repeats, per epoch
    num_reg_images: int
    plan: Any = None  # the engine's DatasetPlan (image sizes and repeats)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for f in self.folders:
            kind = "regularization " if f.is_reg else ""
            out.append(f"{kind}folder {f.name}: {f.images} images x {f.repeats} repeats, "
                       f"{f.captions} with a caption file")
        images = sum(f.images for f in self.folders if not f.is_reg)
        captions = sum(f.captions for f in self.folders if not f.is_reg)
        out.append(f"{images} training images ({captions} captioned), {self.num_train_images} per epoch with repeats")
        return out


def scan_key(store: Any) -> tuple:
    """The settings a scan's result depends on beyond resolution and batch size."""
    return (store.img_folder, store.reg_img_folder, store.caption_extension, store.dataset_config)


def check_dataset(store: Any, progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Scan the dataset ``store`` points at; raise the engine's one-line UserError when it cannot train.

    ``progress(done, total)`` is called as each image has been checked."""
    from frontend.settings_map import to_train_config
    from sd_scripts.data.dataset_layout import scan_dataset

    plan = scan_dataset(to_train_config(store, has_cuda=False, has_xformers=False).config, progress)
    captioned: dict[int, int] = {}
    for record in plan.images:
        if record.caption_source in ("file", "metadata"):
            captioned[record.subset] = captioned.get(record.subset, 0) + 1
    folders = [FolderCount(name=os.path.basename(os.path.normpath(s.image_dir)), repeats=s.num_repeats,
                           images=s.img_count, captions=captioned.get(i, 0), is_reg=s.is_reg)
               for i, s in enumerate(plan.subsets)]
    return DatasetReport(folders, plan.num_train_images, plan.num_reg_images, plan, list(plan.warnings))


def has_transparent_images(folder: str | None, limit: int = 2000) -> bool:
    """True when an image in the ``<n>_<name>`` subfolders of ``folder`` has an alpha channel (or a transparent
    colour): the wizard then offers ``alpha_mask``. Reads file headers only, of at most ``limit`` images."""
    from PIL import Image

    from sd_scripts.data.images import list_images

    if not folder or not os.path.isdir(folder):
        return False
    seen = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        for path in list_images(entry.path):
            seen += 1
            if seen > limit:
                return False
            try:
                with Image.open(path) as img:
                    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                        return True
            except Exception:  # noqa: BLE001 - an unreadable image is the dataset check's to report
                continue
    return False


def _current_spec(store: Any) -> Any:
    """The dataset settings the store asks for now (what ``scan_dataset`` would build from them)."""
    from sd_scripts.data.buckets import snap_bucket_range
    from sd_scripts.data.dataset_layout import DatasetSpec

    width = store.train_resolution
    steps = store.bucket_reso_steps or 64
    low, high = snap_bucket_range(store.min_bucket_resolution, store.max_bucket_resolution, steps)
    return DatasetSpec(resolution=(width, store.height_resolution or width), batch_size=store.batch_size,
                       enable_bucket=store.buckets, min_bucket_reso=low, max_bucket_reso=high, bucket_reso_steps=steps,
                       bucket_no_upscale=store.bucket_no_upscale)


def batches_per_epoch(store: Any, report: DatasetReport) -> int:
    from sd_scripts.data.dataset_layout import place_in_buckets

    plan = report.plan
    specs = plan.datasets if plan.from_dataset_config else [_current_spec(store)]
    batches = 0
    for spec, (_, placements) in zip(specs, place_in_buckets(plan, specs)):
        per_bucket: dict[tuple[int, int], int] = {}
        for p in placements:
            per_bucket[p.bucket] = per_bucket.get(p.bucket, 0) + p.record.repeats
        batches += sum(math.ceil(n / spec.batch_size) for n in per_bucket.values())
    return batches


def estimate_steps(store: Any, report: DatasetReport) -> tuple[int, int, int]:
    """``(total steps, steps per epoch, epochs)`` for one process, as the training loop counts them."""
    per_epoch = max(1, math.ceil(batches_per_epoch(store, report) / max(1, store.gradient_acc_steps or 1)))
    if store.max_steps:
        return store.max_steps, per_epoch, math.ceil(store.max_steps / per_epoch)
    return store.num_epochs * per_epoch, per_epoch, store.num_epochs


def make_report_picture(store: Any, progress: Callable[[int, int], None] | None = None) -> tuple[str, list[str]]:
    """The dataset report of ``store``'s dataset and settings: ``(picture path, summary lines)``. The picture and its
    text go to a new temporary folder, never into the dataset. Raises the engine's one-line UserError."""
    import tempfile

    from frontend.settings_map import to_train_config
    from sd_scripts.data.caption_tokens import find_clip_tokenizer
    from sd_scripts.data.dataset_report import build_report
    from sd_scripts.data.report_picture import save_report_picture
    from sd_scripts.files.atomic import atomic_save_text

    config = to_train_config(store, has_cuda=False, has_xformers=False).config
    report = build_report(config, tokenizer=find_clip_tokenizer(config),
                          progress=None if progress is None else (lambda _stage, done, total: progress(done, total)))
    folder = tempfile.mkdtemp(prefix="lets_dataset_report_")
    name = os.path.basename(os.path.normpath(report.root)) or "dataset"
    png = save_report_picture(report, os.path.join(folder, f"{name}_report.png"))
    lines = report.lines()
    atomic_save_text(os.path.splitext(png)[0] + ".txt", "\n".join(lines) + "\n")
    return png, lines


def open_with_viewer(path: str) -> None:
    """Open ``path`` in the system's picture viewer; a machine without one just keeps the file (its path is shown)."""
    import subprocess
    import sys

    try:
        if sys.platform.startswith("win"):
            os.startfile(path)  # noqa: S606 - the user's own report picture
        elif sys.platform == "darwin":
            subprocess.Popen(["open", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            subprocess.Popen(["xdg-open", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass
