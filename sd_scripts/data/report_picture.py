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
from dataclasses import dataclass
from typing import Any

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
    from sd_scripts.files.atomic import atomic_write

    header = report.settings + [
        f"{len(report.images)} images in {sum(len(b) for b in report.buckets)} buckets; "
        f"{report.batches_per_epoch} batches = {report.steps_per_epoch} steps per epoch; "
        f"{report.problem_count()} with problems"]
    shown = _shown(report, max_thumbnails)
    sheet = _Sheet.blank(_layout_height(report, shown, len(header)))
    _draw_header(sheet, report, header)
    _draw_bucket_chart(sheet, report)
    _draw_legend(sheet, report)
    _draw_contact_sheet(sheet, report, shown)
    _draw_unreadable(sheet, report)
    with atomic_write(path) as f:
        sheet.canvas.save(f, format="PNG", optimize=True)
    return str(path)


@dataclass
class _Sheet:
    """The picture being drawn and how far down it is drawn (``y``)."""

    canvas: Any
    draw: Any
    fonts: dict[str, Any]
    y: int = _MARGIN

    @classmethod
    def blank(cls, height: int) -> _Sheet:
        from PIL import Image, ImageDraw

        canvas = Image.new("RGB", (_W, height), _BACKGROUND)
        fonts = {"title": _font(18), "text": _font(13), "small": _font(10), "mark": _font(9)}
        return cls(canvas, ImageDraw.Draw(canvas), fonts)

    def heading(self, text: str, room: int = 24) -> None:
        self.draw.text((_MARGIN, self.y), text, fill=_TEXT, font=self.fonts["text"])
        self.y += room


def _draw_header(sheet: _Sheet, report: DatasetReport, header: list[str]) -> None:
    draw, fonts = sheet.draw, sheet.fonts
    draw.text((_MARGIN, sheet.y), _fit(f"Dataset report: {report.root}", fonts["title"], _W - 2 * _MARGIN, draw),
              fill=_TEXT, font=fonts["title"])
    sheet.y += 26
    for line in header:
        draw.text((_MARGIN, sheet.y), _fit(line, fonts["text"], _W - 2 * _MARGIN, draw), fill=_MUTED,
                  font=fonts["text"])
        sheet.y += 18
    sheet.y += 14


def _draw_bucket_chart(sheet: _Sheet, report: DatasetReport) -> None:
    """One bar per bucket, its length the images x repeats it trains per epoch."""
    draw, font = sheet.draw, sheet.fonts["text"]
    sheet.heading("Buckets (images x repeats per epoch)")
    most = max((sum(e.repeats for e in entries) for b in report.buckets for entries in b.values()), default=1)
    bar_room = _W - 2 * _MARGIN - _BAR_LABEL_W - 230
    for d, per_bucket in enumerate(report.buckets):
        for bucket, entries in per_bucket.items():
            y = sheet.y
            label = f"{bucket[0]}x{bucket[1]}" + (f" ({d + 1})" if len(report.buckets) > 1 else "")
            with_repeats = sum(e.repeats for e in entries)
            draw.text((_MARGIN + _BAR_LABEL_W - 8, y + _BAR_H // 2), label, fill=_TEXT, font=font, anchor="rm")
            length = max(2, round(bar_room * with_repeats / max(1, most)))
            x0 = _MARGIN + _BAR_LABEL_W
            draw.rectangle([x0, y, x0 + length, y + _BAR_H], fill=_BAR)
            draw.text((x0 + length + 8, y + _BAR_H // 2), f"{len(entries)} images, {with_repeats} with repeats",
                      fill=_MUTED, font=font, anchor="lm")
            sheet.y += _BAR_H + 6
    sheet.y += 14


def _draw_legend(sheet: _Sheet, report: DatasetReport) -> None:
    """The marks, their colours and how many images have each."""
    draw, fonts = sheet.draw, sheet.fonts
    sheet.heading("Marks (the shaded part of a picture is cropped away in training)")
    for key, (mark, text) in PROBLEMS.items():
        y = sheet.y
        count = len(report.with_problem(key))
        w = int(draw.textlength(mark, font=fonts["mark"])) + 6
        draw.rectangle([_MARGIN, y + 1, _MARGIN + w, y + 13], fill=_COLORS[key])
        draw.text((_MARGIN + 3, y + 7), mark, fill=(255, 255, 255), font=fonts["mark"], anchor="lm")
        draw.text((_MARGIN + 90, y + 7), f"{count}: {text}", fill=_MUTED, font=fonts["text"], anchor="lm")
        sheet.y += 18
    sheet.y += 10


def _draw_contact_sheet(sheet: _Sheet, report: DatasetReport, shown) -> None:
    """Each bucket's thumbnails under its name, with their marks."""
    groups = _duplicate_groups(report)
    for d, bucket, entries, left_out in shown:
        title = f"{bucket[0]}x{bucket[1]}" + (f", dataset {d + 1}" if len(report.buckets) > 1 else "")
        total = len(entries) + left_out
        sheet.y += 4
        sheet.heading(f"{title}: {total} image{'s' if total != 1 else ''}", 22)
        for n, entry in enumerate(entries):
            x = _MARGIN + (n % _COLUMNS) * _CELL_W
            cy = sheet.y + (n // _COLUMNS) * _CELL_H
            _thumbnail(sheet.canvas, sheet.draw, entry, x, cy, _marks(entry, groups), sheet.fonts)
        sheet.y += _rows(len(entries)) * _CELL_H
        if left_out:
            sheet.draw.text((_MARGIN, sheet.y), f"and {left_out} more in this bucket (not drawn)", fill=_MUTED,
                            font=sheet.fonts["text"])
            sheet.y += 18


def _marks(entry: ImageEntry, groups: dict[str, int]) -> list[tuple[str, tuple]]:
    """(text, colour) of each of the entry's problems."""
    marks = []
    for key in entry.problems:
        mark = PROBLEMS[key][0]
        if key == "duplicate":
            mark += f" {groups.get(entry.path, '')}".rstrip()
        elif key == "small" and entry.upscale > 1:
            mark += f" x{entry.upscale:.2g}"
        marks.append((mark, _COLORS[key]))
    return marks


def _draw_unreadable(sheet: _Sheet, report: DatasetReport) -> None:
    """The unreadable images as crossed grey tiles."""
    if not report.unreadable:
        return
    draw, small = sheet.draw, sheet.fonts["small"]
    sheet.y += 4
    sheet.heading(f"Unreadable, not trained on: {len(report.unreadable)}", 22)
    for n, (bad, _reason) in enumerate(report.unreadable):
        x = _MARGIN + (n % _COLUMNS) * _CELL_W
        cy = sheet.y + (n // _COLUMNS) * _CELL_H
        draw.rectangle([x, cy, x + _THUMB - 1, cy + _THUMB - 1], fill=(160, 160, 160))
        draw.line([x, cy, x + _THUMB - 1, cy + _THUMB - 1], fill=(120, 120, 120), width=2)
        draw.line([x, cy + _THUMB - 1, x + _THUMB - 1, cy], fill=(120, 120, 120), width=2)
        name = _fit(os.path.basename(bad), small, _THUMB, draw)
        draw.text((x + _THUMB // 2, cy + _THUMB + 2), name, fill=_MUTED, font=small, anchor="mt")
