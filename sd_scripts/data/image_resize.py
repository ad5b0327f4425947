"""Downscale an image dataset to several sizes (the ``image_resize`` tool; kohya's
``resize_images_to_resolution`` rules, reference 2023 §7.3).

For each size S and each image: if it has more than S*S pixels it is scaled down by area,
keeping its aspect ratio (``scale = sqrt(S*S / (w*h))``); images are never enlarged. Both sides
are then floored to a multiple of ``divisible_by`` and the rest is centre-cropped. The result is
written as PNG to ``<dst>/<S>/<same relative folder>/<name>.png`` (so ``<n>_<name>`` folders are
mirrored), with the same-named caption and other companion files copied next to it (not ``.npz``
latent caches, which would no longer match). EXIF orientation is applied. The source is only
read. Images are processed on every core.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sd_scripts.core.errors import ConfigError

__all__ = ["INTERPOLATIONS", "ImageJob", "ResizeReport", "check_resize_args", "plan_dataset", "resize_dataset", "target_size"]

# tool name -> sd_scripts.data.images.resize_image name (PIL filters: box = area averaging)
INTERPOLATIONS = {"area": "area", "cubic": "cubic", "lanczos4": "lanczos"}
_SKIP_COMPANIONS = {".npz"}


def target_size(width: int, height: int, size: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``((resized w, h), (cropped w, h))`` for one image and one size, or None when a side would be
    smaller than ``divisible_by``."""
    if width * height > size * size:
        scale = math.sqrt(size * size / (width * height))
        rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    else:
        rw, rh = width, height
    cw, ch = rw - rw % divisible_by, rh - rh % divisible_by
    if cw <= 0 or ch <= 0:
        return None
    return (rw, rh), (cw, ch)


@dataclass
class ImageJob:
    source: Path
    rel_dir: Path  # relative to the source root
    stem: str
    companions: list[Path] = field(default_factory=list)


@dataclass
class ResizeReport:
    written: list[Path] = field(default_factory=list)
    copied: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def plan_dataset(src, report: ResizeReport | None = None) -> list[ImageJob]:
    """Every image under ``src`` (recursively, sorted) with its same-named companion files.

    A second image with the same name in the same folder (``a.jpg`` and ``a.png``) would write the
    same ``a.png``: it is skipped and reported."""
    from sd_scripts.data.images import is_hidden_name, is_image_file

    src = Path(src)
    jobs: list[ImageJob] = []
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not is_hidden_name(d))
        folder = Path(folder)
        rel = folder.relative_to(src)
        images = sorted(f for f in files if is_image_file(f))
        others = sorted(f for f in files if not is_image_file(f) and not is_hidden_name(f))
        seen: dict[str, str] = {}
        for name in images:
            stem = os.path.splitext(name)[0]
            if stem in seen:
                if report is not None:
                    report.skipped.append((str(folder / name), f"same name as {seen[stem]}, whose PNG it would overwrite"))
                continue
            seen[stem] = name
            companions = [folder / o for o in others
                          if os.path.splitext(o)[0] == stem and os.path.splitext(o)[1].lower() not in _SKIP_COMPANIONS]
            jobs.append(ImageJob(folder / name, rel, stem, companions))
    return jobs


def _process(job: ImageJob, dst: str, sizes: Sequence[int], interpolation: str, divisible_by: int):
    """Worker: one source image -> one PNG per size. Returns ``(written, copied, skipped)``."""
    from sd_scripts.files.atomic import atomic_write
    from sd_scripts.data.images import ImageProblem, load_image, resize_image

    written, copied, skipped = [], [], []
    try:
        img = load_image(str(job.source))
    except ImageProblem as err:
        return written, copied, [(str(job.source), str(err))]
    for size in sizes:
        plan = target_size(img.width, img.height, size, divisible_by)
        if plan is None:
            skipped.append((str(job.source), f"{img.width}x{img.height} is too small for size {size} "
                                             f"(a side would be under {divisible_by} px)"))
            continue
        (rw, rh), (cw, ch) = plan
        out = resize_image(img, (rw, rh), INTERPOLATIONS[interpolation]) if (rw, rh) != img.size else img
        if (cw, ch) != (rw, rh):
            left, top = (rw - cw) // 2, (rh - ch) // 2
            out = out.crop((left, top, left + cw, top + ch))
        folder = Path(dst) / str(size) / job.rel_dir
        target = folder / f"{job.stem}.png"
        with atomic_write(target, "wb") as f:
            out.save(f, format="PNG")
        written.append(target)
        for companion in job.companions:
            copy_to = folder / companion.name
            with atomic_write(copy_to, "wb") as f, open(companion, "rb") as source:
                shutil.copyfileobj(source, f)
            copied.append(copy_to)
    return written, copied, skipped


def check_resize_args(src, dst, sizes: Sequence[int], interpolation: str, divisible_by: int, overwrite: bool) -> tuple[Path, Path]:
    """Validate everything before anything is written (ConfigError naming the setting)."""
    if src is None or not Path(src).is_dir():
        raise ConfigError(f"src: {src} is not a folder; give the dataset folder to downscale", setting="src")
    if dst is None or str(dst).strip() == "":
        raise ConfigError("dst: no output folder given; add --dst FOLDER", setting="dst")
    src_p, dst_p = Path(src).resolve(), Path(dst).resolve()
    if _is_inside(dst_p, src_p) or _is_inside(src_p, dst_p):
        raise ConfigError(f"dst: {dst} and {src} overlap; write the resized images outside the source folder", setting="dst")
    if dst_p.exists() and not dst_p.is_dir():
        raise ConfigError(f"dst: {dst} is a file; give a folder", setting="dst")
    if not sizes:
        raise ConfigError("sizes: no size given; add --sizes 512 384", setting="sizes")
    if int(divisible_by) != divisible_by or divisible_by < 1:
        raise ConfigError(f"divisible_by: {divisible_by!r} must be a whole number of 1 or more", setting="divisible_by")
    for size in sizes:
        if int(size) != size or size < divisible_by:
            raise ConfigError(f"sizes: {size!r} is not a size; give whole numbers of at least {divisible_by} px",
                              setting="sizes")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}",
                          setting="interpolation")
    if not overwrite:
        for size in sizes:
            folder = dst_p / str(int(size))
            if folder.exists() and any(folder.iterdir()):
                raise ConfigError(f"dst: {folder} already exists and is not empty; choose another --dst or add --overwrite",
                                  setting="dst")
    return src_p, dst_p


def resize_dataset(src, dst, sizes: Sequence[int], interpolation: str = "area", divisible_by: int = 64,
                   workers: int | None = None, overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> ResizeReport:
    """Downscale every image under ``src`` to each size (see the module docstring)."""
    sizes = [int(s) for s in dict.fromkeys(sizes)]  # unique, in order
    src_p, dst_p = check_resize_args(src, dst, sizes, interpolation, divisible_by, overwrite)
    report = ResizeReport()
    jobs = plan_dataset(src_p, report)
    if not jobs:
        raise ConfigError(f"src: {src} has no images (.png .jpg .jpeg .webp .bmp)", setting="src")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    done = 0

    def collect(result):
        nonlocal done
        written, copied, skipped = result
        report.written.extend(written)
        report.copied.extend(copied)
        report.skipped.extend(skipped)
        done += 1
        if progress:
            progress(done, len(jobs))

    if workers == 1:
        for job in jobs:
            collect(_process(job, str(dst_p), sizes, interpolation, divisible_by))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_process, job, str(dst_p), sizes, interpolation, divisible_by) for job in jobs]
            for future in futures:
                collect(future.result())
    return report
