"""Which files the status page may send: sample images and logs inside the queue folder or a job's output folder.

A requested path is resolved (``..`` and symbolic links followed) before it is compared with the
allowed folders, so neither a ``..`` nor a link that points outside gets anything out of them.
Settings files (JSON) are never sent: a job's JSON may hold a Hugging Face or wandb token.
"""

from __future__ import annotations

import os

__all__ = ["SERVED_EXTENSIONS", "servable_file", "content_type"]

_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
          ".gif": "image/gif", ".log": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
SERVED_EXTENSIONS = tuple(_TYPES)


def content_type(path: str) -> str:
    return _TYPES[os.path.splitext(path)[1].lower()]


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive on Windows
        return False


def servable_file(path: str, roots: list[str]) -> str | None:
    """The real path of ``path`` if the page may send it, else None.

    ``path`` must be absolute, hold no ``..`` part, name an image or log file, and lie (after every
    link is followed) inside one of ``roots``.
    """
    if not path or "\x00" in path or not os.path.isabs(path):
        return None
    if ".." in path.replace("\\", "/").split("/"):
        return None
    real = os.path.realpath(path)
    if os.path.splitext(real)[1].lower() not in _TYPES or not os.path.isfile(real):
        return None
    for root in roots:
        if root and _inside(real, os.path.realpath(root)):
            return real
    return None
