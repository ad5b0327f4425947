"""Parsing kohya ``network_args`` (``["conv_dim=4", "algo=loha", ...]``) into real values.

kohya passes every ``network_args`` value to the network module as a string; LyCORIS then reads
booleans with ``str(v).lower() != "false"`` (so ``"0"`` and ``"no"`` mean True) and some values not at
all. Here each value becomes a real bool / int / float before any network sees it, and a value
that is not one raises :class:`ConfigError` naming ``network_args`` and the key.

No torch import: preflight uses these checks before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sd_scripts.core.errors import ConfigError

__all__ = [
    "SETTING", "split_network_args", "is_unset", "parse_int", "parse_float", "parse_probability", "parse_bool",
    "parse_int_list", "parse_float_list", "bad_arg",
]

SETTING = "network_args"

_TRUE = ("true", "1", "yes", "on", "y", "t")
_FALSE = ("false", "0", "no", "off", "n", "f")


def bad_arg(key: str, value: Any, what: str) -> ConfigError:
    """``network_args: <key>=<value> <what>`` as a ConfigError naming network_args."""
    shown = value if isinstance(value, str) else str(value)
    return ConfigError(f"{SETTING}: {key}={shown} {what}", setting=SETTING)


def split_network_args(network_args: Sequence[str] | Mapping[str, Any] | str | None) -> dict[str, str]:
    """``["conv_dim=4", "conv_alpha=1"]`` -> ``{"conv_dim": "4", "conv_alpha": "1"}`` (verbatim strings,
    as kohya stores them in ``ss_network_args``). A dict is accepted too; ``None`` gives ``{}``."""
    if network_args is None:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in network_args.items()}
    if isinstance(network_args, str):
        network_args = network_args.split()
    out: dict[str, str] = {}
    for item in network_args:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{SETTING}: {item!r} is not key=value; write it like conv_dim=4", setting=SETTING)
        out[key] = value
    return out


def is_unset(value: Any) -> bool:
    """None, ``""`` and ``"none"`` mean "not given"."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_int(key: str, value: Any, minimum: int | None = None, example: str = "4") -> int | None:
    """A whole number (``"8"``, ``"8.0"``), None when unset."""
    if is_unset(value):
        return None
    number = _number(value)
    if not math.isfinite(number) or number != int(number):
        raise bad_arg(key, value, f"is not a whole number; write it like {key}={example}")
    if minimum is not None and number < minimum:
        raise bad_arg(key, value, f"must be {minimum} or more")
    return int(number)


def parse_float(key: str, value: Any, minimum: float | None = None, above: float | None = None,
                example: str = "1.0") -> float | None:
    """A finite number, None when unset; ``minimum`` is inclusive, ``above`` exclusive."""
    if is_unset(value):
        return None
    number = _number(value)
    if not math.isfinite(number):
        raise bad_arg(key, value, f"is not a number; write it like {key}={example}")
    if minimum is not None and number < minimum:
        raise bad_arg(key, value, f"must be {minimum:g} or more")
    if above is not None and number <= above:
        raise bad_arg(key, value, f"must be above {above:g}")
    return number


def parse_probability(key: str, value: Any) -> float | None:
    """A dropout probability in [0, 1), None when unset."""
    number = parse_float(key, value, example="0.1")
    if number is not None and not 0.0 <= number < 1.0:
        raise bad_arg(key, value, "must be at least 0 and below 1; write it like " + f"{key}=0.1")
    return number


def parse_bool(key: str, value: Any) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case), None when unset. Anything else is an error
    (LyCORIS itself would read ``"0"`` or ``"no"`` as True)."""
    if isinstance(value, bool):
        return value
    if is_unset(value):
        return None
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise bad_arg(key, value, f"is not true or false; write it like {key}=True")


def _split_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [part.strip() for part in str(value).strip().strip("[]").split(",")]


def parse_int_list(key: str, value: Any, minimum: int = 0) -> list[int]:
    """``"4,4,8"`` -> ``[4, 4, 8]`` (each a whole number >= ``minimum``)."""
    out: list[int] = []
    for i, part in enumerate(_split_list(value)):
        number = _number(part)
        if not part or not math.isfinite(number) or number != int(number) or number < minimum:
            raise bad_arg(key, value, f"value {i + 1} ({part!r}) is not a whole number of at least {minimum}; "
                                      f"write comma-separated whole numbers like {key}=4,4,8")
        out.append(int(number))
    return out


def parse_float_list(key: str, value: Any, empty_as: float | None = None) -> list[float]:
    """``"1,0.5,0"`` -> ``[1.0, 0.5, 0.0]``; with ``empty_as`` an empty entry gets that value (kohya
    reads ``"1,,1"`` in lr weights as ``1, 0, 1``)."""
    out: list[float] = []
    for i, part in enumerate(_split_list(value)):
        if not part and empty_as is not None:
            out.append(float(empty_as))
            continue
        number = _number(part)
        if not math.isfinite(number):
            raise bad_arg(key, value, f"value {i + 1} ({part!r}) is not a number; "
                                      f"write comma-separated numbers like {key}=1,0.5,0")
        out.append(number)
    return out
