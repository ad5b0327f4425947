"""Aspect-ratio buckets, compatible with kohya-ss/sd-scripts.

Pure python/numpy. Sizes are ``(width, height)`` tuples throughout.

* :func:`make_bucket_resolutions` builds kohya's predefined bucket list.
* :class:`BucketManager` assigns an image size to a bucket and the size the image is resized
  to before it is cropped to the bucket (``select_bucket``), in the predefined mode or the
  ``bucket_no_upscale`` mode (buckets made per image, never upscaling).
* :func:`crop_offsets` gives the crop (centre, or uniform random with ``random_crop``) of a
  resized image to its bucket; :func:`crop_ltrb` is kohya's "fit box" recorded for SDXL
  conditioning.
* :func:`bucket_info` builds the ``ss_bucket_info`` metadata dict.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Mapping, Sequence

__all__ = [
    "make_bucket_resolutions",
    "snap_bucket_range",
    "BucketManager",
    "crop_offsets",
    "crop_ltrb",
    "bucket_info",
]

Size = tuple[int, int]


def make_bucket_resolutions(
    max_reso: Sequence[int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya's predefined buckets for a training resolution ``max_reso = (W, H)``.

    The area is ``W*H``; the square bucket has side ``floor(sqrt(area)/d)*d``; every width
    ``w`` from ``min_size`` to ``max_size`` in steps of ``d`` gets the height
    ``min(max_size, floor((area // w)/d)*d)`` when that is at least ``min_size``, and both
    ``(w, h)`` and ``(h, w)`` are added. Returned sorted.
    """
    max_width, max_height = int(max_reso[0]), int(max_reso[1])
    max_area = max_width * max_height
    d = int(divisible)
    resos: set[Size] = set()

    side = int(math.sqrt(max_area) // d) * d
    resos.add((side, side))

    width = int(min_size)
    while width <= max_size:
        height = min(int(max_size), int((max_area // width) // d) * d)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += d

    return sorted(resos)


def snap_bucket_range(min_size: int, max_size: int, steps: int) -> tuple[int, int]:
    """Snap ``min_size`` down and ``max_size`` up to multiples of ``steps`` (as kohya does)."""
    min_snapped = int(min_size) - int(min_size) % steps
    max_snapped = int(max_size) + (-int(max_size)) % steps
    return min_snapped, max_snapped


class BucketManager:
    """Assigns image sizes to buckets.

    ``no_upscale=False``: buckets come from :func:`make_bucket_resolutions` (or the
    ``predefined`` list, e.g. ``[resolution]`` when bucketing is off); an image goes to the
    bucket of nearest aspect ratio (its own size if that is a bucket) and is resized to cover it.

    ``no_upscale=True``: images larger than the training area are shrunk to that area keeping
    their aspect ratio; the bucket is the (resized) size floored to ``reso_steps`` (crop, never
    pad), created on first use; min/max bucket sizes are not used.
    """

    def __init__(
        self,
        max_reso: Sequence[int],
        min_size: int = 256,
        max_size: int = 1024,
        reso_steps: int = 64,
        no_upscale: bool = False,
        predefined: Iterable[Sequence[int]] | None = None,
    ):
        self.max_reso: Size = (int(max_reso[0]), int(max_reso[1]))
        self.max_area = self.max_reso[0] * self.max_reso[1]
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.reso_steps = int(reso_steps)
        self.no_upscale = bool(no_upscale)
        if self.no_upscale:
            self.predefined: list[Size] = []
        elif predefined is not None:
            self.predefined = sorted((int(w), int(h)) for w, h in predefined)
        else:
            self.predefined = make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps)
        self._predefined_set = set(self.predefined)
        self._predefined_ars = [w / h for w, h in self.predefined]
        self.resos: list[Size] = list(self.predefined)

    def round_to_steps(self, x: float) -> int:
        v = int(x + 0.5)
        return v - v % self.reso_steps

    def select_bucket(self, width: int, height: int) -> tuple[Size, Size, float]:
        """Return ``(bucket, resized_size, ar_error)`` for an image of ``width x height``.

        ``resized_size`` covers ``bucket`` (both sides >= the bucket's); the image is resized to
        it and then cropped to the bucket. ``ar_error = bucket_ar - image_ar``.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        ar = width / height
        if not self.no_upscale:
            if (width, height) in self._predefined_set:
                bucket = (width, height)
            else:
                errors = [abs(b_ar - ar) for b_ar in self._predefined_ars]
                bucket = self.predefined[min(range(len(errors)), key=errors.__getitem__)]
            bucket_ar = bucket[0] / bucket[1]
            # cover the bucket: match the side that is relatively shorter
            scale = bucket[1] / height if ar > bucket_ar else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            # guard against float rounding leaving a side one pixel short
            resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                # candidate A: width rounded to steps; candidate B: height rounded to steps
                wa = self.round_to_steps(rw)
                ha_steps = self.round_to_steps(wa / ar)
                hb = self.round_to_steps(rh)
                wb_steps = self.round_to_steps(hb * ar)
                err_a = abs(wa / ha_steps - ar) if ha_steps > 0 else math.inf
                err_b = abs(wb_steps / hb - ar) if hb > 0 else math.inf
                if err_a < err_b:
                    resized = (wa, int(wa / ar + 0.5))
                else:
                    resized = (int(hb * ar + 0.5), hb)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
            if bucket[0] <= 0 or bucket[1] <= 0:
                raise ValueError(
                    f"image {width}x{height} is smaller than bucket_reso_steps ({self.reso_steps}) on one side"
                )
            if bucket not in self._predefined_set:
                self._predefined_set.add(bucket)
                self.resos.append(bucket)
        return bucket, resized, bucket[0] / bucket[1] - ar

    def sorted_resos(self) -> list[Size]:
        return sorted(set(self.resos))


def crop_offsets(resized: Sequence[int], bucket: Sequence[int], rng: random.Random | None = None) -> tuple[int, int]:
    """``(left, top)`` of the bucket-sized crop of a ``resized`` image.

    Centred (``excess // 2``) without ``rng``; uniform in ``[0, excess]`` with it (random_crop).
    """
    offsets = []
    for have, want in ((resized[0], bucket[0]), (resized[1], bucket[1])):
        excess = int(have) - int(want)
        if excess < 0:
            raise ValueError(f"resized size {tuple(resized)} does not cover bucket {tuple(bucket)}")
        offsets.append(rng.randint(0, excess) if rng is not None else excess // 2)
    return offsets[0], offsets[1]


def crop_ltrb(bucket: Sequence[int], original_size: Sequence[int]) -> tuple[int, int, int, int]:
    """kohya's ``get_crop_ltrb``: the image fitted (not covered) and centred inside the bucket.

    Recorded as the SDXL crop conditioning; on a flipped sample ``left = bucket_w - right``.
    """
    bw, bh = int(bucket[0]), int(bucket[1])
    ow, oh = original_size
    bucket_ar = bw / bh
    image_ar = ow / oh
    if bucket_ar > image_ar:
        rh = bh
        rw = bh * image_ar
    else:
        rw = bw
        rh = bw / image_ar
    left = int((bw - rw) // 2)
    top = int((bh - rh) // 2)
    return left, top, int(left + rw), int(top + rh)


def bucket_info(
    bucket_counts: Mapping[Size, int] | Iterable[tuple[Size, int]],
    ar_errors: Iterable[float] = (),
    resos: Sequence[Size] | None = None,
) -> dict:
    """The ``ss_bucket_info`` dict: ``{"buckets": {i: {"resolution": (w, h), "count": n}}, "mean_img_ar_error": e}``.

    ``i`` is the bucket's index in the sorted bucket list (``resos``; by default the sorted keys
    of ``bucket_counts``); empty buckets are left out; counts include repeats; the mean is
    over images (without repeats) of ``|ar_error|``.
    """
    counts = dict(bucket_counts)
    order = sorted(set(resos) | set(counts)) if resos is not None else sorted(counts)
    buckets = {}
    for i, reso in enumerate(order):
        n = int(counts.get(reso, 0))
        if n > 0:
            buckets[i] = {"resolution": (int(reso[0]), int(reso[1])), "count": n}
    errors = [abs(float(e)) for e in ar_errors]
    mean = sum(errors) / len(errors) if errors else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean}
