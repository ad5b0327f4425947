"""A loss-and-learning-rate chart as a PNG, drawn with PIL (no plotting library needed).

``save_loss_plot(path, losses, lrs, group_names, validation=)``: the loss of every step (light), its moving
average (dark) and the validation losses (``(step, loss)`` points, joined) on the left axis, and the learning
rate of each parameter group on the right axis. Skipped steps (NaN) leave gaps. The file is written atomically.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

__all__ = ["save_loss_plot", "moving_average"]

_W, _H = 1000, 560
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 86, 46, 54
_LOSS, _AVG, _VAL = (150, 180, 225), (25, 70, 160), (0, 155, 165)
_LR_COLORS = [(230, 120, 20), (40, 150, 70), (170, 50, 160), (200, 40, 40)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN until one is seen)."""
    out, buf, total = [], [], 0.0
    for v in values:
        if math.isfinite(v):
            buf.append(v)
            total += v
            if len(buf) > window:
                total -= buf.pop(0)
        out.append(total / len(buf) if buf else float("nan"))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9 and len(out) < 20:
        out.append(v)
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3 or a >= 1e5:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _range(values: list[float]) -> tuple[float, float]:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0, 1.0
    lo, hi = finite[0], finite[-1]
    if len(finite) > 50:  # keep a few spikes from flattening the rest
        hi = min(hi, finite[int(len(finite) * 0.995)] * 1.15 + 1e-12)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def save_loss_plot(path: str | os.PathLike, losses: Sequence[float], lrs: Sequence[Sequence[float]] | None = None,
                   group_names: Sequence[str] | None = None, title: str = "", first_step: int = 1,
                   validation: Sequence[tuple[int, float]] | None = None) -> str:
    """Draw the chart and write it to ``path`` (PNG, atomically); returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    from sd_scripts.files.atomic import atomic_write

    losses = [float(v) for v in losses]
    img = Image.new("RGB", (_W, _H), "white")
    chart = _Chart(ImageDraw.Draw(img), ImageFont.load_default(), len(losses), first_step)
    chart.d.rectangle([chart.x0, chart.y0, chart.x1, chart.y1], outline=(120, 120, 120))
    _draw_steps(chart)
    legend = _draw_losses(chart, losses, validation)
    legend += _draw_lrs(chart, lrs, group_names)
    _draw_title_and_legend(chart, title, legend)
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return str(path)


class _Chart:
    """The drawing, its font, the plot area and the x position of each step."""

    def __init__(self, d, font, n: int, first_step: int):
        self.d, self.font, self.n, self.first_step = d, font, n, first_step
        self.x0, self.x1, self.y0, self.y1 = _LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM

    def xpos(self, i: int) -> float:
        return self.x0 + (self.x1 - self.x0) * (i / max(self.n - 1, 1))


def _draw_steps(c: _Chart) -> None:
    """The x axis: steps."""
    last_step = c.first_step + max(c.n - 1, 0)
    for t in _ticks(c.first_step, last_step, 8):
        t = int(round(t))
        x = c.x0 + (c.x1 - c.x0) * ((t - c.first_step) / max(last_step - c.first_step, 1))
        c.d.line([x, c.y1, x, c.y1 + 4], fill=(90, 90, 90))
        c.d.text((x, c.y1 + 6), str(t), fill=(60, 60, 60), font=c.font, anchor="mt")
    c.d.text(((c.x0 + c.x1) / 2, _H - 14), "step", fill=(40, 40, 40), font=c.font, anchor="mm")


def _draw_losses(c: _Chart, losses: list[float], validation) -> list[tuple[str, tuple]]:
    """The loss, its moving average and the validation loss on the left axis; their legend entries."""
    d, font = c.d, c.font
    val_points = [(int(step), float(v)) for step, v in (validation or []) if math.isfinite(float(v))]
    lo, hi = _range(losses + [v for _, v in val_points])

    def ypos(v: float) -> float:
        v = min(max(v, lo), hi)
        return c.y1 - (c.y1 - c.y0) * ((v - lo) / (hi - lo))

    for t in _ticks(lo, hi):
        y = ypos(t)
        d.line([c.x0, y, c.x1, y], fill=(235, 235, 235))
        d.line([c.x0 - 4, y, c.x0, y], fill=(90, 90, 90))
        d.text((c.x0 - 6, y), _fmt(t), fill=_AVG, font=font, anchor="rm")
    d.text((12, (c.y0 + c.y1) / 2), "loss", fill=_AVG, font=font, anchor="lm")
    window = max(1, min(100, c.n // 20 or 1))
    avg = moving_average(losses, window)
    _polyline(d, [(c.xpos(i), ypos(v)) for i, v in enumerate(losses)], _LOSS, 1)
    _polyline(d, [(c.xpos(i), ypos(v)) for i, v in enumerate(avg)], _AVG, 2)
    val_xy = [(c.xpos(step - c.first_step), ypos(v)) for step, v in val_points]
    _polyline(d, val_xy, _VAL, 2)
    for x, y in val_xy:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_VAL)
    legend = [("loss", _LOSS), (f"loss, average of {window}", _AVG)]
    if val_points:
        legend.append(("validation loss", _VAL))
    return legend


def _draw_lrs(c: _Chart, lrs, group_names) -> list[tuple[str, tuple]]:
    """The learning rate of each group on the right axis; their legend entries."""
    d, font, n = c.d, c.font, c.n
    rows = [list(map(float, r)) for r in (lrs or [])]
    if not (rows and any(rows)):
        return []
    groups = max(len(r) for r in rows)
    names = list(group_names or [])
    names += [f"group {i}" for i in range(len(names), groups)]
    all_lr = [v for r in rows for v in r if math.isfinite(v)]
    llo, lhi = _range(all_lr)
    if all_lr and min(all_lr) >= 0:
        llo = 0.0  # learning rates start the axis at zero

    def lypos(v: float) -> float:
        v = min(max(v, llo), lhi)
        return c.y1 - (c.y1 - c.y0) * ((v - llo) / (lhi - llo))

    for t in _ticks(llo, lhi):
        y = lypos(t)
        d.line([c.x1, y, c.x1 + 4, y], fill=(90, 90, 90))
        d.text((c.x1 + 6, y), _fmt(t), fill=_LR_COLORS[0], font=font, anchor="lm")
    d.text((_W - 12, (c.y0 + c.y1) / 2), "lr", fill=_LR_COLORS[0], font=font, anchor="rm")
    legend = []
    for g in range(groups):
        color = _LR_COLORS[g % len(_LR_COLORS)]
        pts = [(c.xpos(i), lypos(r[g])) if g < len(r) else (c.xpos(i), float("nan")) for i, r in enumerate(rows[:n] if n else rows)]
        _polyline(d, pts, color, 1)
        legend.append((f"lr {names[g]}", color))
    return legend


def _draw_title_and_legend(c: _Chart, title: str, legend: list[tuple[str, tuple]]) -> None:
    d, font = c.d, c.font
    d.text((c.x0, 16), title, fill=(20, 20, 20), font=font, anchor="lm")
    lx = c.x1
    for label, color in reversed(legend):
        w = d.textlength(label, font=font)
        lx -= w + 26
        d.line([lx, 16, lx + 16, 16], fill=color, width=3)
        d.text((lx + 20, 16), label, fill=(40, 40, 40), font=font, anchor="lm")
    if c.n == 0:
        d.text(((c.x0 + c.x1) / 2, (c.y0 + c.y1) / 2), "no steps", fill=(120, 120, 120), font=font, anchor="mm")


def _polyline(d, pts: list[tuple[float, float]], color, width: int) -> None:
    """Draw connected points, breaking the line at NaN values; thin long runs to one point per pixel column."""
    seg: list[tuple[float, float]] = []
    last_x = None
    for x, y in pts:
        if not math.isfinite(y):
            _flush(d, seg, color, width)
            seg, last_x = [], None
            continue
        if last_x is not None and int(x) == int(last_x) and len(pts) > 4000 and seg:
            continue
        seg.append((x, y))
        last_x = x
    _flush(d, seg, color, width)


def _flush(d, seg, color, width) -> None:
    if len(seg) == 1:
        x, y = seg[0]
        d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=color)
    elif len(seg) > 1:
        d.line(seg, fill=color, width=width)
