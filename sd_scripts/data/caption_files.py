"""Caption files beside images: their extension, whether one exists, reading one as UTF-8.

Shared by the dataset tools that read or write captions (``tag_images``, ``edit_tags``).
"""

from __future__ import annotations

from ..core.errors import ConfigError, DatasetError
from .images import IMAGE_EXTENSIONS

__all__ = ["check_caption_extension", "has_caption", "read_caption_text"]


def check_caption_extension(ext: str, setting: str = "caption_extension") -> str:
    """``ext`` when it is a caption file extension (``.txt``); ConfigError otherwise (an image's extension too)."""
    if not ext or not ext.startswith(".") or len(ext) < 2 or any(c in ext for c in "/\\"):
        raise ConfigError(f"{setting}: {ext!r} must be a file extension starting with a dot, e.g. .txt", setting=setting)
    if ext.lower() in IMAGE_EXTENSIONS:
        raise ConfigError(f"{setting}: {ext} is an image extension; captions would replace images. Use .txt",
                          setting=setting)
    return ext


def has_caption(path: str) -> bool:
    """A caption file with something in it (an empty or blank file is no caption)."""
    try:
        with open(path, "rb") as f:
            return bool(f.read().removeprefix(b"\xef\xbb\xbf").strip())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def read_caption_text(path: str, setting: str = "dataset") -> str:
    """A caption file's text (UTF-8, a BOM kept as the first character); DatasetError for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{setting}: cannot read caption file '{path}' ({e.strerror}); check its permissions",
                           setting=setting) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{setting}: caption file '{path}' is not UTF-8 text (byte {data[e.start]:#04x} at position "
                           f"{e.start}); open it and save it as UTF-8, then run again (nothing was changed)",
                           setting=setting) from None
