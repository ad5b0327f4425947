"""Image files: which files are images, checking them during the dataset scan, loading them as RGB.

* :func:`is_image_file`: ``.png .jpg .jpeg .webp .bmp`` in any case; hidden files (``.x``,
  macOS ``._x.jpg``) and ``Thumbs.db``-style files are not images.
* :func:`probe_image`: opens and fully decodes an image once (cheaply: JPEGs at 1/8 scale) so
  that truncated or undecodable files and decompression bombs are found before training;
  returns the size after EXIF orientation, or raises :class:`ImageProblem` with a short reason.
* :func:`load_image` / :func:`to_rgb`: RGB with EXIF orientation applied; palette, CMYK, 16-bit
  and transparent images (composited on white) converted correctly.
* :func:`load_preview`: a small RGB copy (longest side at most ``max_side``; JPEGs decoded at a reduced scale),
  for thumbnails and perceptual hashes.
* :func:`load_image_with_alpha`: for kohya's ``alpha_mask``: the colour channels as stored (not
  composited, as kohya uses them) and the alpha channel as an ``L`` image (``None`` without alpha).

Nothing here writes files.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageProblem",
    "is_image_file",
    "is_hidden_name",
    "list_images",
    "probe_image",
    "bomb_warnings_as_errors",
    "load_image",
    "load_preview",
    "load_image_with_alpha",
    "to_rgb",
    "resize_image",
    "RESIZE_INTERPOLATIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}


class ImageProblem(Exception):
    """An image file cannot be used; ``str()`` is the reason (e.g. "truncated or corrupt file")."""


def is_hidden_name(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with an image extension (any case)."""
    base = os.path.basename(name)
    if is_hidden_name(base):
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> list[str]:
    """Image files directly inside ``folder`` (not recursive), sorted by name, as full paths."""
    names: Iterable[str]
    with os.scandir(folder) as it:
        names = [e.name for e in it if is_image_file(e.name) and e.is_file()]
    return [os.path.join(folder, n) for n in sorted(names)]


@contextlib.contextmanager
def bomb_warnings_as_errors():
    """Turn Pillow's DecompressionBombWarning into an exception (caught as :class:`ImageProblem`).

    ``warnings.catch_warnings`` changes process-wide state, so enter this in one thread only
    (around a thread pool that probes images), not inside each worker thread.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _pixel_limit() -> int | None:
    return Image.MAX_IMAGE_PIXELS


def _check_pixels(width: int, height: int) -> None:
    limit = _pixel_limit()
    if limit is not None and width * height > limit:
        raise ImageProblem(
            f"{width}x{height} has more pixels than the decompression-bomb limit ({limit}); downscale it"
        )


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block does not make the image unusable
        return 1


def probe_image(path: str) -> tuple[int, int]:
    """Check that ``path`` decodes fully; return ``(width, height)`` after EXIF orientation.

    Raises :class:`ImageProblem` for empty, truncated, undecodable or too large files (more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS``). Call it inside :func:`bomb_warnings_as_errors` to keep
    Pillow's DecompressionBombWarning from being printed (the image is refused either way).
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageProblem("empty file")
        with Image.open(path) as img:
            width, height = img.size
            _check_pixels(width, height)
            fmt = img.format
            img.verify()  # structure / checksums (PNG CRCs, ...)
        with Image.open(path) as img:
            orientation = _exif_orientation(img)
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()  # decodes all data: truncated files fail here
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageProblem(f"larger than the decompression-bomb limit ({_pixel_limit()} pixels); downscale it") from e
    except Image.UnidentifiedImageError as e:
        raise ImageProblem("not a readable image (unknown or broken format)") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        reason = str(e).strip() or type(e).__name__
        raise ImageProblem(f"truncated or corrupt file ({reason})") from e
    if width <= 0 or height <= 0:
        raise ImageProblem("has no pixels")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return width, height


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 257.0 + 0.5).clip(0, 255).astype(np.uint8)
    if mode == "I":
        arr = arr.astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return (arr * (255.0 / top) + 0.5).clip(0, 255).astype(np.uint8)
    if mode == "F":
        arr = arr.astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return (arr + 0.5).clip(0, 255).astype(np.uint8)
    return arr.clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("LA")
        mode = "LA"
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"

    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8(np.asarray(img), mode)
        return Image.fromarray(np.ascontiguousarray(gray), "L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        if mode in ("RGBa", "La"):
            img = img.convert("RGBA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Load ``path`` as an 8-bit RGB PIL image with its EXIF orientation applied.

    Raises :class:`ImageProblem` when the file cannot be decoded.
    """
    with _decoded(path) as img:
        return to_rgb(img)


def load_preview(path: str, max_side: int) -> Image.Image:
    """A small 8-bit RGB copy of ``path`` (EXIF orientation applied), its longest side at most ``max_side``.

    Raises :class:`ImageProblem` when the file cannot be decoded."""
    with _decoded(path, draft=(max_side, max_side)) as img:
        small = to_rgb(img).copy()
    small.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return small


@contextlib.contextmanager
def _decoded(path: str, draft: tuple[int, int] | None = None):
    """The image at ``path``, decoded and turned upright by its EXIF orientation; any decoding problem (also while
    the caller converts it) becomes an :class:`ImageProblem`. ``draft``: a JPEG may be decoded at a reduced scale
    no smaller than this size."""
    try:
        with Image.open(path) as img:
            _check_pixels(*img.size)
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            yield ImageOps.exif_transpose(img) or img
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageProblem(f"larger than the decompression-bomb limit ({_pixel_limit()} pixels); downscale it") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageProblem(f"cannot be decoded ({str(e).strip() or type(e).__name__})") from e


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def load_image_with_alpha(path: str) -> tuple[Image.Image, Image.Image | None]:
    """``(rgb, alpha)`` of ``path`` with its EXIF orientation applied, for kohya's ``alpha_mask``.

    ``rgb`` holds the colour channels as stored, not composited (kohya loads RGBA and drops the alpha,
    so the VAE sees what the file keeps under transparent pixels); ``alpha`` is an 8-bit ``L`` image,
    or ``None`` for an image without transparency (an all-opaque mask). Raises :class:`ImageProblem`.
    """
    with _decoded(path) as img:
        if not _has_alpha(img):
            return to_rgb(img), None
        rgba = img.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")


_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}

RESIZE_INTERPOLATIONS = tuple(_FILTERS)


def resize_image(img: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Resize to ``size = (w, h)``: area (box) filter when shrinking, Lanczos when enlarging (kohya's rule),
    or the named ``interpolation`` (lanczos, nearest, bilinear/linear, bicubic/cubic, area/box)."""
    size = (int(size[0]), int(size[1]))
    if img.size == size:
        return img
    if interpolation:
        resample = _FILTERS[interpolation.lower()]
    elif size[0] * size[1] < img.size[0] * img.size[1]:
        resample = Image.Resampling.BOX
    else:
        resample = Image.Resampling.LANCZOS
    return img.resize(size, resample=resample)
