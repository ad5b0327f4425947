"""What preflight hands to the training: the :class:`Plan` (dataset, model family, warnings, summary, disk space)
and the one-line summary of the scanned dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd_scripts.data.dataset_plan import DatasetPlan

__all__ = ["Plan", "DiskNeed", "dataset_summary"]


@dataclass
class DiskNeed:
    """Bytes a run will write to one file system."""

    path: str  # the folder the bytes go to (first one seen on that file system)
    setting: str  # the setting that chose that folder
    bytes: int = 0
    parts: list[str] = field(default_factory=list)


@dataclass
class Plan:
    dataset: DatasetPlan | None = None
    family: Any = None
    model_info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    disk: list[DiskNeed] = field(default_factory=list)
    steps: int | None = None  # optimizer steps the run will take, estimated from the image count (buckets aside)


def dataset_summary(dataset: DatasetPlan) -> list[str]:
    """One or two lines describing the scanned dataset, counting images without a caption file."""
    images = dataset.images
    if not images:
        return []
    train = [r for r in images if not r.is_reg]
    reg = [r for r in images if r.is_reg]
    folders = len({(r.dataset, r.subset) for r in train})
    line = (f"dataset: {len(train)} training image(s) in {folders} folder(s), "
            f"{dataset.num_train_images} with repeats")
    if reg:
        line += f"; {len(reg)} regularization image(s)"
    no_caption = [r for r in train if r.caption_source not in ("file", "metadata")]
    if no_caption:
        tokens = sum(1 for r in no_caption if r.caption_source == "class_tokens")
        kind = "a caption" if any(r.caption_source == "metadata" for r in train) else "a caption file"
        line += f"; {len(no_caption)} without {kind}"
        if tokens:
            line += f" ({tokens} use their folder's class tokens)"
    held_out = dataset.validation_images
    if held_out:
        line += f"; {len(held_out)} held out for the validation loss"
    skipped = dataset.skipped
    if skipped:
        line += f"; {len(skipped)} skipped"
    return [line]
