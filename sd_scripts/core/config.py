"""TrainConfig: every engine setting, under kohya-ss/sd-scripts' argument names.

This is the engine's single description of a training run. Its fields are made from the declarations in
:mod:`sd_scripts.core.settings` (every setting the engine reads, with kohya's name, type, default and help in
``metadata["help"]``); ``sd_scripts/train_network.py`` builds its command line from these fields and ``main.py``
maps the friendly ArgStore onto it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .setting import is_number as is_finite_number
from .settings import engine_settings, front_settings

__all__ = ["TrainConfig", "config_fields", "is_whole_number", "is_finite_number"]


def _renames() -> dict[str, str]:
    """Front end name -> engine name, for the help lines that mention other settings."""
    return {s.name: s.kohya_name for s in front_settings() if s.in_engine and s.kohya_name != s.name}


def _declared_fields(cls: type) -> type:
    """Add a field for every engine setting of the declaration table, then make ``cls`` a dataclass."""
    renames = _renames()
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for setting in engine_settings():
        name = setting.kohya_name
        annotations[name] = setting.engine_type
        meta = {"help": setting.engine_help(renames)}
        if isinstance(setting.engine_default, (list, dict)):
            value = field(default_factory=setting.fresh_engine_default, metadata=meta)
        else:
            value = field(default=setting.engine_default, metadata=meta)
        setattr(cls, name, value)
    cls.__annotations__ = annotations
    return dataclass(cls)


@_declared_fields
class TrainConfig:
    """Every engine setting under kohya's name (the fields come from :mod:`sd_scripts.core.settings`)."""

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def is_whole_number(value: Any) -> bool:
    """True for an int setting value (a bool is not one), for the value checks."""
    return isinstance(value, int) and not isinstance(value, bool)
