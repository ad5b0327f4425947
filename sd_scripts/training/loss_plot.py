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
    n = len(losses)
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))

    def xpos(i: int) -> float:
        return x0 + (x1 - x0) * (i / max(n - 1, 1))

    # x axis: steps
    last_step = first_step + max(n - 1, 0)
    for t in _ticks(first_step, last_step, 8):
        t = int(round(t))
        x = x0 + (x1 - x0) * ((t - first_step) / max(last_step - first_step, 1))
        d.line([x, y1, x, y1 + 4], fill=(90, 90, 90))
        d.text((x, y1 + 6), str(t), fill=(60, 60, 60), font=font, anchor="mt")
    d.text(((x0 + x1) / 2, _H - 14), "step", fill=(40, 40, 40), font=font, anchor="mm")

    # loss, left axis
    val_points = [(int(step), float(v)) for step, v in (validation or []) if math.isfinite(float(v))]
    lo, hi = _range(losses + [v for _, v in val_points])

    def ypos(v: float) -> float:
        v = min(max(v, lo), hi)
        return y1 - (y1 - y0) * ((v - lo) / (hi - lo))

    for t in _ticks(lo, hi):
        y = ypos(t)
        d.line([x0, y, x1, y], fill=(235, 235, 235))
        d.line([x0 - 4, y, x0, y], fill=(90, 90, 90))
        d.text((x0 - 6, y), _fmt(t), fill=_AVG, font=font, anchor="rm")
    d.text((12, (y0 + y1) / 2), "loss", fill=_AVG, font=font, anchor="lm")
    window = max(1, min(100, n // 20 or 1))
    avg = moving_average(losses, window)
    _polyline(d, [(xpos(i), ypos(v)) for i, v in enumerate(losses)], _LOSS, 1)
    _polyline(d, [(xpos(i), ypos(v)) for i, v in enumerate(avg)], _AVG, 2)
    val_xy = [(xpos(step - first_step), ypos(v)) for step, v in val_points]
    _polyline(d, val_xy, _VAL, 2)
    for x, y in val_xy:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_VAL)

    # learning rates, right axis
    legend = [("loss", _LOSS), (f"loss, average of {window}", _AVG)]
    if val_points:
        legend.append(("validation loss", _VAL))
    rows = [list(map(float, r)) for r in (lrs or [])]
    if rows and any(rows):
        groups = max(len(r) for r in rows)
        names = list(group_names or [])
        names += [f"group {i}" for i in range(len(names), groups)]
        all_lr = [v for r in rows for v in r if math.isfinite(v)]
        llo, lhi = _range(all_lr)
        if all_lr and min(all_lr) >= 0:
            llo = 0.0  # learning rates start the axis at zero

        def lypos(v: float) -> float:
            v = min(max(v, llo), lhi)
            return y1 - (y1 - y0) * ((v - llo) / (lhi - llo))

        for t in _ticks(llo, lhi):
            y = lypos(t)
            d.line([x1, y, x1 + 4, y], fill=(90, 90, 90))
            d.text((x1 + 6, y), _fmt(t), fill=_LR_COLORS[0], font=font, anchor="lm")
        d.text((_W - 12, (y0 + y1) / 2), "lr", fill=_LR_COLORS[0], font=font, anchor="rm")
        for g in range(groups):
            color = _LR_COLORS[g % len(_LR_COLORS)]
            pts = [(xpos(i), lypos(r[g])) if g < len(r) else (xpos(i), float("nan")) for i, r in enumerate(rows[:n] if n else rows)]
            _polyline(d, pts, color, 1)
            legend.append((f"lr {names[g]}", color))

    # title and legend
    d.text((x0, 16), title, fill=(20, 20, 20), font=font, anchor="lm")
    lx = x1
    for label, color in reversed(legend):
        w = d.textlength(label, font=font)
        lx -= w + 26
        d.line([lx, 16, lx + 16, 16], fill=color, width=3)
        d.text((lx + 20, 16), label, fill=(40, 40, 40), font=font, anchor="lm")
    if n == 0:
        d.text(((x0 + x1) / 2, (y0 + y1) / 2), "no steps", fill=(120, 120, 120), font=font, anchor="mm")

    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return str(path)


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
