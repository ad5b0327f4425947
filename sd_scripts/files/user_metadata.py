"""The user's own ``modelspec.*`` keys of a LoRA file: title, author, trigger phrase, thumbnail, ...

kohya-ss/sd-scripts fills them from ``--metadata_title`` / ``--metadata_author`` / ... (``sai_model_spec``);
AUTOMATIC1111/Forge, ComfyUI and Civitai show them. The title defaults to ``output_name``. A thumbnail
given as an image file is stored as a ``data:image/...;base64,`` URL, as kohya does; a data URL is stored
as it is. ``no_metadata`` does not remove these keys (kohya writes the modelspec keys in every file).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.core.problems import Problems

__all__ = ["USER_MODELSPEC_KEYS", "modelspec_title", "user_modelspec", "thumbnail_data_url",
           "check_metadata_settings", "merged_user_modelspec"]

# TrainConfig setting -> modelspec key (without the "modelspec." prefix); the title is handled on its own
USER_MODELSPEC_KEYS = {
    "metadata_author": "author",
    "metadata_description": "description",
    "metadata_license": "license",
    "metadata_tags": "tags",
    "metadata_trigger_phrase": "trigger_phrase",
    "metadata_usage_hint": "usage_hint",
    "metadata_thumbnail": "thumbnail",
}
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(?P<payload>.*)$", re.DOTALL)
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
_LARGE_THUMBNAIL = 1024 * 1024


def _text(value: Any) -> str | None:
    """A setting's text, or None when it is unset or blank."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def modelspec_title(config: TrainConfig) -> str | None:
    """``metadata_title``, else ``output_name`` (kohya's order)."""
    return _text(config.metadata_title) or _text(config.output_name)


def _image_mime(path: str) -> str | None:
    """The MIME type of an image file PIL can read, or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _MIME.get(str(im.format).upper(), f"image/{str(im.format).lower()}")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def thumbnail_data_url(value: str) -> str:
    """``metadata_thumbnail`` as stored: a data URL as it is, an image file as a base64 data URL."""
    text = value.strip()
    if text.startswith("data:"):
        return text
    problem = _thumbnail_problem(text)
    if problem:
        raise ConfigError(f"metadata_thumbnail: {problem}", "metadata_thumbnail")
    path = os.path.expanduser(text)
    with open(path, "rb") as f:
        payload = base64.b64encode(f.read()).decode("ascii")
    return f"data:{_image_mime(path)};base64,{payload}"


def _thumbnail_problem(text: str) -> str | None:
    if text.startswith("data:"):
        match = _DATA_URL.match(text)
        if not match:
            return "a data URL must look like data:image/png;base64,<data>; or give the path of an image file"
        try:
            base64.b64decode(match.group("payload"), validate=True)
        except (binascii.Error, ValueError):
            return "the data URL's base64 data is damaged; give the path of an image file instead"
        return None
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        return f"not found: {text}; give an image file (png, jpg, webp) or a data:image/...;base64 URL"
    if os.path.isdir(path):
        return f"{text} is a folder; give an image file (png, jpg, webp)"
    if not os.access(path, os.R_OK):
        return f"{text} cannot be read (permission denied); check its permissions"
    if _image_mime(path) is None:
        return f"{text} is not an image file that can be read; give a png, jpg or webp image"
    return None


def user_modelspec(config: TrainConfig) -> dict[str, str]:
    """The ``modelspec.*`` keys the user set (author, description, ..., thumbnail as a data URL)."""
    out: dict[str, str] = {}
    for setting, key in USER_MODELSPEC_KEYS.items():
        value = _text(getattr(config, setting))  # a setting named in USER_MODELSPEC_KEYS
        if value is None:
            continue
        out[f"modelspec.{key}"] = thumbnail_data_url(value) if setting == "metadata_thumbnail" else value
    return out


def check_metadata_settings(config: TrainConfig, problems: Problems | None = None) -> tuple[list[UserError], list[str]]:
    """Preflight: the metadata settings (the thumbnail must be an image), recorded in ``problems``; returns its
    ``(errors, warnings)``."""
    problems = Problems() if problems is None else problems
    value = _text(config.metadata_thumbnail)
    if value is None:
        return problems.errors, problems.warnings
    text = value.strip()
    problem = _thumbnail_problem(text)
    if problem:
        problems.error("metadata_thumbnail", problem)
    elif not text.startswith("data:") and os.path.getsize(os.path.expanduser(text)) > _LARGE_THUMBNAIL:
        size = os.path.getsize(os.path.expanduser(text)) / (1024 * 1024)
        problems.warn(f"metadata_thumbnail: {text} is {size:.1f} MB and is stored in every LoRA file (as base64, "
                      "a third larger); a small image such as 256x256 is enough")
    return problems.errors, problems.warnings


def merged_user_modelspec(metadatas: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The user keys a LoRA merged from several files keeps: every distinct trigger phrase and tag, and
    the author, license, description, usage hint and thumbnail where all the files that have one agree."""
    out: dict[str, str] = {}
    for key in ("trigger_phrase", "tags"):
        parts: list[str] = []
        for md in metadatas:
            for part in str(md.get(f"modelspec.{key}") or "").split(","):
                part = part.strip()
                if part and part not in parts:
                    parts.append(part)
        if parts:
            out[f"modelspec.{key}"] = ", ".join(parts)
    for key in ("author", "license", "description", "usage_hint", "thumbnail"):
        values = {md[f"modelspec.{key}"] for md in metadatas if _text(md.get(f"modelspec.{key}"))}
        if len(values) == 1:
            out[f"modelspec.{key}"] = values.pop()
    return out
