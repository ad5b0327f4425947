"""Settings JSON files: load ours, the 2023 tool's and kohya_ss GUI files; save ours.

Our files and the 2023 tool's are the same format: the flat ArgStore dict (keys starting with
``_comment`` or ``//`` are notes for readers and are skipped). kohya_ss GUI files are
recognised by their keys and go through :mod:`frontend.kohya_ss_import`. Loading never stops at
the first problem: every value of the wrong type is reported (one line each, naming the key and
the type expected), and keys with no use here are listed together in one warning.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.core.settings import front_settings

from .loaded_settings import LoadedSettings, coerce_file_values

__all__ = [
    "LoadedSettings",
    "read_json_file",
    "load_settings_file",
    "save_settings_json",
    "write_json_atomic",
    "is_kohya_ss_file",
    "coerce_file_values",
]

# Keys of the 2023 tool's files that older versions spelled differently (declared with each setting).
RENAMED_2023_KEYS = {old: s.name for s in front_settings() for old in s.old_names}
# Keys the 2023 tool wrote that carry nothing to load (when null or false).
LEFTOVER_2023_KEYS = {"list_of_json_to_run"}

_KOHYA_MARKERS = {"pretrained_model_name_or_path", "train_data_dir", "output_dir", "LoRA_type", "max_resolution",
                  "lr_warmup", "epoch", "optimizer", "train_batch_size", "network_dim"}
_OUR_MARKERS = {"base_model", "img_folder", "output_folder", "net_dim", "alpha", "scheduler", "train_resolution"}


def read_json_file(path: str) -> Any:
    """Parse a JSON file; a mistake in it becomes one line with the line and column."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ConfigError(f"load_json_path: file not found: {path}", setting="load_json_path")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise ConfigError(f"load_json_path: cannot read {path}: {err.strerror}", setting="load_json_path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{name}: not UTF-8 text (byte {err.start}); save it as UTF-8", setting="load_json_path") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                          setting="load_json_path") from None


def is_kohya_ss_file(data: dict) -> bool:
    keys = set(data)
    return bool(keys & _KOHYA_MARKERS) and not (keys & _OUR_MARKERS)


def load_settings_file(path: str, store_cls: type | None = None) -> LoadedSettings:
    """Read a settings file of any supported format; raise UserErrors listing every bad value."""
    if store_cls is None:
        from ArgsList import ArgStore as store_cls  # noqa: N813
    data = read_json_file(path)
    name = os.path.basename(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a JSON object of settings, found a {type(data).__name__}",
                          setting="load_json_path")
    infos = {info.name: info for info in store_cls.settings()}
    if is_kohya_ss_file(data):
        from .kohya_ss_import import convert_kohya_ss

        return convert_kohya_ss(data, path, infos)

    loaded = LoadedSettings(path=os.path.abspath(path), fmt="lets")
    raw: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        target = RENAMED_2023_KEYS.get(key, key)
        if target in infos:
            current = raw.get(target, (None, None))[0]
            if key != target and current not in (None, ""):
                continue  # the current name wins over an old spelling...
            if key == target and value in (None, "") and target in raw:
                continue  # ...unless it is empty (2023 files wrote both keys)
            raw[target] = (value, key)
            if key != target:
                loaded.notes.append(f"{name}: {key} is read as {target}")
        elif key in LEFTOVER_2023_KEYS and not value:
            continue
        elif key.startswith(("_comment", "//")):
            continue  # a note for people reading the file
        else:
            loaded.ignored.append(key)
    problems = Problems()
    values = coerce_file_values(raw, infos, name, problems)
    problems.raise_errors()
    loaded.skip_list = list(values.pop("json_load_skip_list", None) or [])
    loaded.values = values
    return loaded


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            json.dump(data, handle, indent=4, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_settings_dict(store) -> dict[str, Any]:
    """The flat dict we save: every ArgStore key; a saved file always trains when loaded."""
    data = store.to_dict()
    data["save_json_only"] = False
    return data


def save_settings_json(store, folder: str, name: str | None = None, now: float | None = None) -> str:
    """Save ``config-<YYYYmmdd-HHMMSS>[-<name>].json`` in ``folder``; return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    suffix = f"-{name}" if name else ""
    base = os.path.join(folder, f"config-{stamp}{suffix}")
    path = base + ".json"
    count = 2
    while os.path.exists(path):
        path = f"{base}-{count}.json"
        count += 1
    write_json_atomic(path, saved_settings_dict(store))
    return path
