"""kohya's string ``network_args`` for LyCORIS (``network_module = lycoris.kohya``) as the real values lycoris-lora
4.x should see: :func:`parse_lycoris_args` -> :class:`LycorisArgs`, and :func:`read_preset_file` for a preset
``.toml``. No torch and no lycoris import, so preflight uses it. What it fixes or decides (values, old names,
presets): the docstring of :mod:`.lycoris_adapter`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.networks.block_weights import BLOCK_ARG_KEYS
from sd_scripts.networks.network_args import (
    SETTING, bad_arg, is_unset, parse_bool, parse_float, parse_int, parse_probability,
)

__all__ = ["NETWORK_MODULE", "LYCORIS_ALGOS", "LYCORIS_PRESETS", "PROBABILITY_ARGS", "LORAPLUS_ARGS", "LycorisArgs",
           "parse_lycoris_args", "read_preset_file"]

NETWORK_MODULE = "lycoris.kohya"

# algo -> what it is (for messages). All train, save and load with lycoris-lora 4.1.3.
LYCORIS_ALGOS: dict[str, str] = {
    "lora": "LoCon (LoRA on linear layers and convolutions)",
    "locon": "LoCon (same as lora)",
    "loha": "LoHa (Hadamard product)",
    "lokr": "LoKr (Kronecker product)",
    "ia3": "(IA)^3",
    "dylora": "DyLoRA",
    "full": "full fine-tune of the targeted layers (diff)",
    "diag-oft": "diagonal OFT",
    "boft": "butterfly OFT",
    "glora": "GLoRA",
}
# Algorithms LyCORIS has but this trainer refuses, with the reason.
_REFUSED_ALGOS = {
    "tlora": "its files need SVD buffers that are not saved, so no UI can load them",
}
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")
# Keys a preset .toml may hold (lycoris config_sdk.VALID_PRESET_KEYS).
_PRESET_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
                "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                "text_encoder_target_name", "exclude_name")

_BOOL_ARGS = ("use_tucker", "use_scalar", "train_norm", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
              "bypass_mode", "rs_lora", "unbalanced_factorization", "decompose_both")
# 2023 names of use_tucker: name -> True when the value is inverted.
_TUCKER_ALIASES = {"use_conv_cp": False, "use_cp": False, "cp_decomp": False, "disable_conv_cp": True}
PROBABILITY_ARGS = ("dropout", "rank_dropout", "module_dropout")
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_KNOWN_ARGS = (("algo", "preset", "conv_dim", "conv_alpha", "block_size", "factor", "constraint", "constrain")
               + _BOOL_ARGS + tuple(_TUCKER_ALIASES) + PROBABILITY_ARGS + LORAPLUS_ARGS)
# Algorithms without a rank (network_dim / conv_dim do not apply).
_RANKLESS = ("ia3", "full")


@dataclass
class LycorisArgs:
    """``network_args`` for LyCORIS as real values.

    ``kwargs`` go to ``lycoris.kohya.create_network`` (without ``preset``); ``preset`` is a built-in
    name or a path to a .toml file; ``enable_conv`` False when ``conv_dim=0``."""

    algo: str = "lora"
    preset: str = "full"
    kwargs: dict[str, Any] = field(default_factory=dict)
    enable_conv: bool | None = None
    problems: Problems = field(default_factory=Problems)  # what parsing found (warnings; errors raise)

    @property
    def warnings(self) -> list[str]:
        return self.problems.warnings


def parse_lycoris_args(args: Mapping[str, Any], *, network_dim: int | None = None, network_alpha: float | None = None,
                       network_dropout: float | None = None) -> LycorisArgs:
    """Parse kohya ``network_args`` (the :func:`split_network_args` dict) for ``lycoris.kohya``.

    Raises ConfigError naming network_args and the key for an unknown algo or preset, a value that
    is not a number/boolean, or contradicting Tucker switches. Cheap: no torch, no lycoris import."""
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    out = LycorisArgs()
    raw = {k: v for k, v in args.items() if not is_unset(v)}
    out.algo = _parse_algo(raw)
    out.kwargs["algo"] = out.algo
    out.preset = _parse_preset(raw, out)
    _parse_numbers(raw, out, network_dim, network_dropout)
    for key in _BOOL_ARGS:
        value = parse_bool(key, raw.get(key))
        if value is not None:
            out.kwargs[key] = value
    _parse_tucker(raw, out)
    _check_combinations(raw, out, network_dim)
    block_keys = [k for k in raw if k in BLOCK_ARG_KEYS]
    if block_keys:
        out.problems.warn(f"network_args: {', '.join(block_keys)} work with network_module networks.lora only; "
                            "lycoris.kohya ignores them")
    unknown = [k for k in raw if k not in _KNOWN_ARGS and k not in BLOCK_ARG_KEYS]
    if unknown:
        out.problems.warn(f"network_args not used by {NETWORK_MODULE}: {', '.join(unknown)}")
    return out


def _parse_algo(raw: dict) -> str:
    algo = str(raw.get("algo", "lora")).strip().lower()
    if algo in _REFUSED_ALGOS:
        raise bad_arg("algo", raw["algo"], f"is not supported: {_REFUSED_ALGOS[algo]}; use one of "
                                           f"{', '.join(LYCORIS_ALGOS)}")
    if algo not in LYCORIS_ALGOS:
        raise bad_arg("algo", raw["algo"], f"is not a LyCORIS algorithm; use one of {', '.join(LYCORIS_ALGOS)}")
    return algo


def _parse_preset(raw: dict, out: LycorisArgs) -> str:
    """A built-in preset name (lower case) or a checked preset file's path."""
    preset = str(raw.get("preset", "full")).strip()
    if preset.lower() in LYCORIS_PRESETS:
        name = preset.lower()
    elif preset.lower().endswith(".toml") or os.path.isfile(preset):
        read_preset_file(preset)  # checks it
        name = preset
    else:
        raise bad_arg("preset", preset, f"is not a LyCORIS preset; use one of {', '.join(LYCORIS_PRESETS)} "
                                        "or the path of a preset .toml file")
    if out.algo == "ia3" and name not in ("ia3",) and "preset" not in raw:
        out.problems.warn("network_args: algo=ia3 usually goes with preset=ia3 (LyCORIS recommends it); "
                            "using preset=full")
    return name


def _parse_numbers(raw: dict, out: LycorisArgs, network_dim: int, network_dropout: float | None) -> None:
    """conv_dim/conv_alpha, the dropouts, block_size, factor, constraint and the LoRA+ ratios."""
    kw = out.kwargs
    conv_dim = parse_int("conv_dim", raw.get("conv_dim"), minimum=0)
    if conv_dim == 0:
        out.enable_conv = False
    elif conv_dim is not None:
        kw["conv_dim"] = conv_dim
    conv_alpha = parse_float("conv_alpha", raw.get("conv_alpha"), minimum=0.0)
    if conv_alpha is not None:
        # LyCORIS turns a 0 into network_alpha; 0 means alpha = rank everywhere else.
        kw["conv_alpha"] = float(conv_alpha or (conv_dim or network_dim))

    for key in PROBABILITY_ARGS:
        value = parse_probability(key, raw.get(key))
        if value is not None:
            kw[key] = value
    if "dropout" not in kw and network_dropout is not None:
        kw["dropout"] = parse_probability("network_dropout", network_dropout)

    block_size = parse_int("block_size", raw.get("block_size"), minimum=1)
    if block_size is not None:
        kw["block_size"] = block_size
    factor = parse_int("factor", raw.get("factor"), example="-1")
    if factor is not None:
        if factor == 0 or factor < -1:
            raise bad_arg("factor", raw["factor"], "must be -1 (balanced) or a positive whole number like 8")
        kw["factor"] = factor
    if "constrain" in raw and "constraint" not in raw:
        out.problems.warn("network_args: constrain is the old name of constraint; read as constraint")
    constraint = parse_float("constraint", raw.get("constraint", raw.get("constrain")), minimum=0.0)
    if constraint is not None:
        kw["constraint"] = constraint
    for key in LORAPLUS_ARGS:
        value = parse_float(key, raw.get(key), above=0.0, example="16")
        if value is not None:
            kw[key] = value


def _parse_tucker(raw: dict, out: LycorisArgs) -> None:
    """use_tucker and its 2023 names must agree."""
    kw = out.kwargs
    tucker: dict[str, bool] = {}
    if "use_tucker" in kw:
        tucker["use_tucker"] = kw["use_tucker"]
    for alias, inverted in _TUCKER_ALIASES.items():
        value = parse_bool(alias, raw.get(alias))
        if value is None:
            continue
        meaning = (not value) if inverted else value
        tucker[alias] = meaning
        out.problems.warn(f"network_args: {alias}={raw[alias]} is a 2023 name; read as use_tucker={meaning}")
    if len(set(tucker.values())) > 1:
        shown = ", ".join(f"{k}={raw[k]}" for k in tucker)
        raise ConfigError(f"{SETTING}: {shown} contradict each other (Tucker on and off); keep only use_tucker",
                          setting=SETTING)
    if tucker:
        kw["use_tucker"] = next(iter(tucker.values()))


def _check_combinations(raw: dict, out: LycorisArgs, network_dim: int) -> None:
    """Combinations LyCORIS cannot build (errors) or ignores (warnings)."""
    algo, kw = out.algo, out.kwargs
    if algo == "dylora":
        size = kw.get("block_size", 4)
        for name, dim in (("network_dim", network_dim), ("conv_dim", kw.get("conv_dim", network_dim))):
            if dim % size:
                raise bad_arg("block_size", size, f"must divide {name} {dim} for algo=dylora; pick a block_size "
                                                  "that divides both network_dim and conv_dim")
    if algo == "glora" and kw.get("use_tucker"):
        raise bad_arg("use_tucker", raw.get("use_tucker", "True"), "cannot be used with algo=glora "
                                                                   "(LyCORIS cannot build Tucker GLoRA); turn it off")
    if algo == "full" and kw.get("bypass_mode"):
        raise bad_arg("bypass_mode", raw["bypass_mode"], "cannot be used with algo=full; turn it off")
    if algo in ("loha", "lokr") and kw.get("dropout"):
        # LyCORIS 4.x ignores it there and prints a warning line per module
        kw.pop("dropout")
        out.problems.warn(f"network_args: dropout (network_dropout) does nothing with algo={algo}; "
                            "use rank_dropout or module_dropout")
    if algo in _RANKLESS and (kw.get("use_tucker") or kw.get("dora_wd")):
        which = "use_tucker" if kw.get("use_tucker") else "dora_wd"
        out.problems.warn(f"network_args: {which} does nothing with algo={algo}")


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)
    with open(path, "rb") as f:
        return tomllib.load(f)


def read_preset_file(path: str) -> dict[str, Any]:
    """Read and check a LyCORIS preset .toml; ConfigError naming network_args when it cannot be used."""
    if not os.path.isfile(path):
        raise bad_arg("preset", path, "was not found; give the path of a preset .toml file or a built-in preset name")
    try:
        data = _load_toml(path)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise bad_arg("preset", path, f"is not a valid TOML file ({first})") from None
    unknown = sorted(k for k in data if k not in _PRESET_KEYS)
    if unknown:
        raise bad_arg("preset", path, f"has unknown keys {', '.join(unknown)}; valid keys are {', '.join(_PRESET_KEYS)}")
    for key, value in data.items():
        if key in ("enable_conv", "use_fnmatch"):
            ok, what = isinstance(value, bool), "true or false"
        elif key.endswith("algo_map"):
            ok, what = isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()), "a table of tables"
        elif key == "lora_prefix":
            ok, what = isinstance(value, str), "a string"
        else:
            ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        if not ok:
            raise bad_arg("preset", path, f"has {key} = {value!r}, which must be {what}")
    return data
