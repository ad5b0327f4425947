"""The dataset report as a PNG, drawn with PIL: a bucket chart and a contact sheet.

``save_report_picture(report, path)``:

* a header with the dataset, the settings and the counts;
* the bucket chart: one bar per bucket (width x height), its length the images x repeats the bucket trains
  per epoch, labelled with its images and that count;
* the contact sheet: the thumbnails of each bucket under its name; the part of each picture the training
  crops away is shaded (the centre crop; ``random_crop`` moves it); images with a problem get a coloured frame
  and a mark per problem (NO CAPTION, SMALL, DUPLICATE with the number of its group, LONG caption); the
  unreadable images close the sheet as grey tiles. At most ``max_thumbnails`` thumbnails are drawn, those with
  problems first; the rest are counted under their bucket.

The file is written atomically.
"""

from __future__ import annotations

import os

from sd_scripts.data.buckets import crop_offsets
from sd_scripts.data.images import ImageProblem, load_preview

from .dataset_report import PROBLEMS, DatasetReport, ImageEntry

__all__ = ["save_report_picture"]

_W = 1000
_MARGIN = 16
_THUMB = 104
_GAP = 8
_NAME_H = 14
_CELL_W = _THUMB + _GAP
_CELL_H = _THUMB + _NAME_H + _GAP
_COLUMNS = (_W - 2 * _MARGIN + _GAP) // _CELL_W
_BAR_H = 16
_BAR_LABEL_W = 96
_BACKGROUND = (250, 250, 248)
_TEXT = (30, 30, 30)
_MUTED = (110, 110, 110)
_BAR = (70, 120, 190)
_CELL = (228, 228, 226)
_CROP_SHADE = (0, 0, 0, 110)
_COLORS = {"no_caption": (205, 40, 40), "small": (225, 135, 0), "duplicate": (150, 60, 190), "long_caption": (0, 130, 150)}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _duplicate_groups(report: DatasetReport) -> dict[str, int]:
    """Path -> group number (1, 2, ...) of the near-duplicate pairs joined into groups."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b, _ in report.duplicates:
        parent[find(a)] = find(b)
    groups: dict[str, int] = {}
    numbers: dict[str, int] = {}
    for entry in report.images:  # numbered in the order the images are listed
        if entry.path in parent:
            root = find(entry.path)
            numbers.setdefault(root, len(numbers) + 1)
            groups[entry.path] = numbers[root]
    return groups


def _shown(report: DatasetReport, max_thumbnails: int) -> list[tuple[int, tuple[int, int], list[ImageEntry], int]]:
    """``(dataset, bucket, entries drawn, entries left out)`` per bucket, problems first, within the cap."""
    total = max(1, len(report.images))
    out = []
    for d, per_bucket in enumerate(report.buckets):
        for bucket, entries in per_bucket.items():
            quota = len(entries) if total <= max_thumbnails else max(1, max_thumbnails * len(entries) // total)
            ordered = sorted(entries, key=lambda e: not e.problems)
            out.append((d, bucket, ordered[:quota], len(entries) - min(quota, len(entries))))
    return out


def _rows(count: int) -> int:
    return (count + _COLUMNS - 1) // _COLUMNS


def _layout_height(report: DatasetReport, shown, header_lines: int) -> int:
    height = _MARGIN + 26 + 18 * header_lines + 14
    height += 24 + (_BAR_H + 6) * sum(len(b) for b in report.buckets) + 14
    height += 24 + 18 * len(PROBLEMS) + 10
    for _, _, entries, left_out in shown:
        height += 26 + _rows(len(entries)) * _CELL_H + (18 if left_out else 0)
    if report.unreadable:
        height += 26 + _rows(len(report.unreadable)) * _CELL_H
    return height + _MARGIN


def _fit(text: str, font, width: int, draw) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _thumbnail(canvas, draw, entry: ImageEntry, x: int, y: int, marks: list[tuple[str, tuple]], fonts) -> None:
    from PIL import Image, ImageDraw

    draw.rectangle([x, y, x + _THUMB - 1, y + _THUMB - 1], fill=_CELL)
    try:
        small = load_preview(entry.path, _THUMB)
    except ImageProblem:
        small = None
    if small is not None:
        if max(small.size) < _THUMB:  # a small image fills the tile too
            scale = _THUMB / max(small.size)
            small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                                 Image.Resampling.BICUBIC)
        ox, oy = x + (_THUMB - small.width) // 2, y + (_THUMB - small.height) // 2
        canvas.paste(small, (ox, oy))
        # shade what the training crops away (the centre crop of the resized image to the bucket)
        left, top = crop_offsets(entry.resized, entry.bucket)
        sx, sy = small.width / entry.resized[0], small.height / entry.resized[1]
        keep = (round(left * sx), round(top * sy), round((left + entry.bucket[0]) * sx),
                round((top + entry.bucket[1]) * sy))
        if keep != (0, 0, small.width, small.height):
            shade = Image.new("RGBA", small.size, _CROP_SHADE)
            ImageDraw.Draw(shade).rectangle([keep[0], keep[1], keep[2] - 1, keep[3] - 1], fill=(0, 0, 0, 0))
            canvas.paste(Image.new("RGB", small.size, (0, 0, 0)), (ox, oy), shade)
    if marks:
        color = marks[0][1]
        draw.rectangle([x - 2, y - 2, x + _THUMB + 1, y + _THUMB + 1], outline=color, width=3)
        my = y + 2
        for text, mark_color in marks:
            w = int(draw.textlength(text, font=fonts["mark"])) + 6
            draw.rectangle([x + 2, my, x + 2 + w, my + 12], fill=mark_color)
            draw.text((x + 5, my + 6), text, fill=(255, 255, 255), font=fonts["mark"], anchor="lm")
            my += 14
    name = _fit(os.path.basename(entry.path), fonts["small"], _THUMB, draw)
    draw.text((x + _THUMB // 2, y + _THUMB + 2), name, fill=_MUTED, font=fonts["small"], anchor="mt")


def save_report_picture(report: DatasetReport, path: str | os.PathLike, max_thumbnails: int = 400) -> str:
    """Draw ``report`` (see the module docstring) and write it to ``path`` as a PNG; returns the path."""
    from PIL import Image, ImageDraw

    from sd_scripts.files.atomic import atomic_write

    fonts = {"title": _font(18), "text": _font(13), "small": _font(10), "mark": _font(9)}
    header = report.settings + [
        f"{len(report.images)} images in {sum(len(b) for b in report.buckets)} buckets; "
        f"{report.batches_per_epoch} batches = {report.steps_per_epoch} steps per epoch; "
        f"{report.problem_count()} with problems"]
    shown = _shown(report, max_thumbnails)
    canvas = Image.new("RGB", (_W, _layout_height(report, shown, len(header))), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    y = _MARGIN
    draw.text((_MARGIN, y), _fit(f"Dataset report: {report.root}", fonts["title"], _W - 2 * _MARGIN, draw),
              fill=_TEXT, font=fonts["title"])
    y += 26
    for line in header:
        draw.text((_MARGIN, y), _fit(line, fonts["text"], _W - 2 * _MARGIN, draw), fill=_MUTED, font=fonts["text"])
        y += 18
    y += 14

    # the bucket chart
    draw.text((_MARGIN, y), "Buckets (images x repeats per epoch)", fill=_TEXT, font=fonts["text"])
    y += 24
    most = max((sum(e.repeats for e in entries) for b in report.buckets for entries in b.values()), default=1)
    bar_room = _W - 2 * _MARGIN - _BAR_LABEL_W - 230
    for d, per_bucket in enumerate(report.buckets):
        for bucket, entries in per_bucket.items():
            label = f"{bucket[0]}x{bucket[1]}" + (f" ({d + 1})" if len(report.buckets) > 1 else "")
            with_repeats = sum(e.repeats for e in entries)
            draw.text((_MARGIN + _BAR_LABEL_W - 8, y + _BAR_H // 2), label, fill=_TEXT, font=fonts["text"], anchor="rm")
            length = max(2, round(bar_room * with_repeats / max(1, most)))
            x0 = _MARGIN + _BAR_LABEL_W
            draw.rectangle([x0, y, x0 + length, y + _BAR_H], fill=_BAR)
            draw.text((x0 + length + 8, y + _BAR_H // 2), f"{len(entries)} images, {with_repeats} with repeats",
                      fill=_MUTED, font=fonts["text"], anchor="lm")
            y += _BAR_H + 6
    y += 14

    # the legend of marks
    draw.text((_MARGIN, y), "Marks (the shaded part of a picture is cropped away in training)", fill=_TEXT,
              font=fonts["text"])
    y += 24
    for key, (mark, text) in PROBLEMS.items():
        count = len(report.with_problem(key))
        w = int(draw.textlength(mark, font=fonts["mark"])) + 6
        draw.rectangle([_MARGIN, y + 1, _MARGIN + w, y + 13], fill=_COLORS[key])
        draw.text((_MARGIN + 3, y + 7), mark, fill=(255, 255, 255), font=fonts["mark"], anchor="lm")
        draw.text((_MARGIN + 90, y + 7), f"{count}: {text}", fill=_MUTED, font=fonts["text"], anchor="lm")
        y += 18
    y += 10

    # the contact sheet
    groups = _duplicate_groups(report)
    for d, bucket, entries, left_out in shown:
        title = f"{bucket[0]}x{bucket[1]}" + (f", dataset {d + 1}" if len(report.buckets) > 1 else "")
        total = len(entries) + left_out
        draw.text((_MARGIN, y + 4), f"{title}: {total} image{'s' if total != 1 else ''}", fill=_TEXT, font=fonts["text"])
        y += 26
        for n, entry in enumerate(entries):
            x = _MARGIN + (n % _COLUMNS) * _CELL_W
            cy = y + (n // _COLUMNS) * _CELL_H
            marks = []
            for key in entry.problems:
                mark = PROBLEMS[key][0]
                if key == "duplicate":
                    mark += f" {groups.get(entry.path, '')}".rstrip()
                elif key == "small" and entry.upscale > 1:
                    mark += f" x{entry.upscale:.2g}"
                marks.append((mark, _COLORS[key]))
            _thumbnail(canvas, draw, entry, x, cy, marks, fonts)
        y += _rows(len(entries)) * _CELL_H
        if left_out:
            draw.text((_MARGIN, y), f"and {left_out} more in this bucket (not drawn)", fill=_MUTED, font=fonts["text"])
            y += 18
    if report.unreadable:
        draw.text((_MARGIN, y + 4), f"Unreadable, not trained on: {len(report.unreadable)}", fill=_TEXT,
                  font=fonts["text"])
        y += 26
        for n, (bad, _reason) in enumerate(report.unreadable):
            x = _MARGIN + (n % _COLUMNS) * _CELL_W
            cy = y + (n // _COLUMNS) * _CELL_H
            draw.rectangle([x, cy, x + _THUMB - 1, cy + _THUMB - 1], fill=(160, 160, 160))
            draw.line([x, cy, x + _THUMB - 1, cy + _THUMB - 1], fill=(120, 120, 120), width=2)
            draw.line([x, cy + _THUMB - 1, x + _THUMB - 1, cy], fill=(120, 120, 120), width=2)
            name = _fit(os.path.basename(bad), fonts["small"], _THUMB, draw)
            draw.text((x + _THUMB // 2, cy + _THUMB + 2), name, fill=_MUTED, font=fonts["small"], anchor="mt")

    with atomic_write(path) as f:
        canvas.save(f, format="PNG", optimize=True)
    return str(path)
