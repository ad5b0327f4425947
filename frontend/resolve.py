"""From ArgsList defaults, a JSON file and the command line to one checked ArgStore.

Precedence is per setting: the command line beats the JSON file, which beats ``ArgsList.py``.
A value of 0, False or "" given at a higher level wins like any other value. Deprecated 2023
settings are translated inside each source before the sources are merged, so a modern setting
given at a higher level always wins over an old one given lower down. Last, an SDXL base model (``sdxl``
set, or told from the model's header) gets SDXL-sized resolution and buckets for the settings left at
ArgsList.py's SD sizes and set neither in the JSON file nor on the command line (one note says so).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.core.rules import check_rules

from .fields import SettingInfo, coerce
from .json_io import LoadedSettings, load_settings_file
from .model_family import apply_family_defaults

__all__ = ["Resolved", "resolve_settings", "merge_job", "migrate_deprecated", "resolve_paths", "validate_store",
           "looks_like_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BAD_NAME_CHARS = set('/\\:*?"<>|')


@dataclass
class Resolved:
    store: Any
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    loaded: LoadedSettings | None = None


def _store_cls():
    from ArgsList import ArgStore

    return ArgStore


def _infos() -> dict[str, SettingInfo]:
    return {info.name: info for info in _store_cls().settings()}


def looks_like_hub_id(text: str) -> bool:
    """``runwayml/stable-diffusion-v1-5``: an owner/name that is not a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~")) and "\\" not in text


def migrate_deprecated(values: dict[str, Any], lower: Any, source: str) -> list[str]:
    """Replace old settings in ``values`` (one source) by their successors; return notes.

    ``lower`` is the store built from the sources below this one, used when an old setting
    needs a value the source itself does not give (LoCon's dim defaults to net_dim).
    """
    notes: list[str] = []
    use_8bit = values.pop("use_8bit_adam", False)
    use_lion = values.pop("use_lion", False)
    if use_8bit and use_lion:
        raise ConfigError(f"{source}: use_8bit_adam and use_lion are both true; remove both and set "
                          "optimizer_type (AdamW8bit or Lion)", setting="optimizer_type")
    if use_8bit or use_lion:
        name = "AdamW8bit" if use_8bit else "Lion"
        old = "use_8bit_adam" if use_8bit else "use_lion"
        values["optimizer_type"] = name
        notes.append(f"{source}: {old} is deprecated; using optimizer_type {name}")

    locon = values.pop("locon", False)
    locon_dim = values.pop("locon_dim", None)
    locon_alpha = values.pop("locon_alpha", None)
    if locon or locon_dim is not None:
        args = dict(values.get("network_args") or lower.network_args or {})
        conv_dim = locon_dim if locon_dim is not None else values.get("net_dim", lower.net_dim)
        args.setdefault("conv_dim", str(conv_dim))
        if locon_alpha is not None:
            args.setdefault("conv_alpha", _number_text(locon_alpha))
        values["network_args"] = args
        shown = " ".join(f"{k}={args[k]}" for k in ("conv_dim", "conv_alpha") if k in args)
        notes.append(f"{source}: locon/locon_dim/locon_alpha are deprecated; using network_args {shown} (kohya LoCon)")
    elif locon_alpha is not None:
        notes.append(f"{source}: locon_alpha has no effect without locon or locon_dim; ignored")

    misspelled = values.pop("caption_extention", None)
    if misspelled:  # kohya's old spelling wins over caption_extension, as in kohya
        values["caption_extension"] = misspelled
        notes.append(f"{source}: caption_extention is kohya's old misspelling; using caption_extension {misspelled}")
    return notes


def _number_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def resolve_paths(values: dict[str, Any], infos: dict[str, SettingInfo], also_look_in: str | None = None) -> None:
    """Make the relative paths in ``values`` absolute, in place.

    Paths are relative to the current folder. For inputs read from a JSON file, a path that does not
    exist there but does exist beside the JSON file is taken from beside the file.
    """
    cwd = os.getcwd()
    for name, value in list(values.items()):
        info = infos.get(name)
        if info is None or not info.is_path or not isinstance(value, str) or not value.strip():
            continue
        text = os.path.expanduser(value.strip())
        if os.path.isabs(text):
            values[name] = os.path.normpath(text)
            continue
        candidates = [cwd]
        if also_look_in and info.path != "out_dir":
            candidates.append(also_look_in)
        found = next((os.path.join(base, text) for base in candidates if os.path.exists(os.path.join(base, text))), None)
        if found is None and info.path == "model" and looks_like_hub_id(text):
            values[name] = text
            continue
        values[name] = os.path.normpath(os.path.abspath(found or os.path.join(cwd, text)))


def _typed(values: dict[str, Any], infos: dict[str, SettingInfo], source: str) -> dict[str, Any]:
    """Check and convert values given in Python (ArgsList.py edits, callers of resolve_settings)."""
    out: dict[str, Any] = {}
    problems = Problems()
    for name, value in values.items():
        if name not in infos:
            problems.add(ConfigError(f"{source}: unknown setting {name}", setting=name))
            continue
        try:
            out[name] = coerce(infos[name], value)
        except ValueError as err:
            problems.error(name, str(err), where=source)
    problems.raise_errors()
    return out


def resolve_settings(
    cli_values: dict[str, Any] | None = None,
    defaults: Any = None,
    *,
    apply_skip_list: bool = True,
) -> Resolved:
    """Merge defaults < JSON file < command line, key by key; raise UserError(s) on bad input."""
    store_cls = _store_cls()
    infos = _infos()
    cli_values = _typed(dict(cli_values or {}), infos, "command line")
    notes: list[str] = []
    found = Problems()

    base_values = _typed((defaults if defaults is not None else store_cls()).to_dict(), infos, "ArgsList.py")
    notes += migrate_deprecated(base_values, store_cls(), "ArgsList.py")
    resolve_paths(base_values, infos)
    store = store_cls(**base_values)

    json_path = cli_values.get("load_json_path", store.load_json_path)
    loaded = None
    values_from_file: dict[str, Any] = {}
    if json_path:
        json_path = os.path.abspath(os.path.expanduser(json_path))
        loaded = load_settings_file(json_path, store_cls)
        values = dict(loaded.values)
        skip: set[str] = set()
        if apply_skip_list:
            skip = set(loaded.skip_list) | set(cli_values.get("json_load_skip_list") or store.json_load_skip_list or [])
        unknown = sorted(skip - set(infos))
        if unknown:
            raise ConfigError(f"json_load_skip_list: unknown setting(s) {', '.join(unknown)}; use ArgStore names "
                              "such as base_model, img_folder, output_folder", setting="json_load_skip_list")
        for name in list(values):
            if name in skip or infos[name].session:
                values.pop(name)
        notes += loaded.notes
        notes += migrate_deprecated(values, store, os.path.basename(json_path))
        resolve_paths(values, infos, also_look_in=os.path.dirname(json_path))
        if loaded.warning():
            found.warn(loaded.warning())
        store = store.replace(**values)
        store = store.replace(load_json_path=json_path)
        values_from_file = values

    cli = dict(cli_values)
    notes += migrate_deprecated(cli, store, "command line")
    resolve_paths(cli, infos)
    store = store.replace(**cli)
    # an SDXL model gets 1024 px and 512-2048 buckets where ArgsList.py's SD sizes were left as they are
    store, sized = apply_family_defaults(store, fixed=set(cli) | set(values_from_file))
    if sized:
        notes.append(sized)
    return Resolved(store=store, notes=notes, warnings=found.warnings, loaded=loaded)


def merge_job(job_path: str, cli_values: dict[str, Any], defaults: Any = None) -> Resolved:
    """Settings of one queue job: defaults < the job's JSON (all of it) < command line."""
    values = dict(cli_values)
    values["load_json_path"] = job_path
    values.pop("multi_run_folder", None)
    resolved = resolve_settings(values, defaults, apply_skip_list=False)
    resolved.store = resolved.store.replace(multi_run_folder=None, save_json_folder=None, save_json_only=False)
    return resolved


# --------------------------------------------------------------------------- checks
def _check_path(info: SettingInfo, value: str) -> str | None:
    if info.path == "file" and not os.path.isfile(value):
        return "not found" if not os.path.exists(value) else "is a folder, expected a file"
    if info.path == "dir" and not os.path.isdir(value):
        return "folder not found" if not os.path.exists(value) else "is a file, expected a folder"
    if info.path == "file_or_dir" and not os.path.exists(value):
        return "not found"
    if info.path == "model" and not os.path.exists(value) and not looks_like_hub_id(value):
        return "not found (give a .safetensors/.ckpt file, a diffusers folder or a Hugging Face id)"
    if info.path == "out_dir" and os.path.exists(value) and not os.path.isdir(value):
        return "is a file, expected a folder"
    return None


def validate_store(store: Any, *, for_training: bool = True) -> None:
    """Check required settings, paths, ranges and combinations; raise UserErrors listing all problems."""
    problems = Problems()
    skip_paths = {"load_json_path", "multi_run_folder"}
    for info in store.settings():
        value = getattr(store, info.name)
        if info.required and value is None:
            if info.name == "img_folder" and (store.dataset_config or store.in_json):
                continue
            problems.error(info.name, f"required; set it in ArgsList.py, in a JSON file or with --{info.name}")
            continue
        if info.is_path and isinstance(value, str) and info.name not in skip_paths:
            problem = _check_path(info, value)
            if problem:
                problems.error(info.name, f"{problem}: {value}")
    # the declared ranges (sd_scripts/core/settings.py): required settings first
    for info in sorted(store.settings(), key=lambda i: not i.required):
        problem = info.declaration.front_problem(getattr(store, info.name))
        if problem:
            problems.error(info.name, problem)
    check_rules(store, "front", problems)
    for name in ("change_output_name", "save_json_name"):
        value = getattr(store, name)
        if value and (_BAD_NAME_CHARS & set(value)):
            problems.error(name, f"{value!r} contains characters not allowed in file names")
    if store.resume_from_huggingface:
        problems.error("resume_from_huggingface", "not supported; download the state folder and set resume to it")
    if for_training:
        from .settings_map import unsupported_settings

        for name, text in unsupported_settings(store):
            problems.error(name, text)
    problems.raise_errors()
