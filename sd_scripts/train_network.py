"""kohya-compatible command line for the engine: ``python -m sd_scripts.train_network --flag value ...``
(``sd_scripts.sdxl_train_network`` is the same command with the model family fixed to SDXL, as kohya's script).

Every flag is a field of :class:`sd_scripts.core.config.TrainConfig` under kohya's name.
Booleans are ``--flag`` (on) and ``--no-flag`` (off); list settings take several values.
``--config_file x.toml`` reads the same names from a TOML file (command line wins).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sd_scripts.core.config import TrainConfig, config_fields  # noqa: E402
from sd_scripts.core.settings import GROUPS, declared_in_engine  # noqa: E402

__all__ = ["build_parser", "config_from_args", "main"]


def _base_type(tp) -> type:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotation strings of TrainConfig (from __future__ annotations)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return args[0] if len(args) == 1 else str
    return tp


def _numbers_or_number(tp) -> bool:
    """``float | list[float] | None`` (text_encoder_lr: one value, or one per text encoder as kohya's nargs)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return float in args and any(typing.get_origin(a) is list for a in args)


def _resolved_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in config_fields()}


def build_parser(prog: str = "train_network.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a kohya-compatible LoRA.")
    parser.add_argument("--config_file", help="TOML file with settings (command line wins)")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}  # as main.py -h lists them
    types = _resolved_types()
    for f in config_fields():
        tp = types[f.name]
        base = _base_type(tp)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        group = groups[declared_in_engine(f.name).group]
        if base is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif _numbers_or_number(tp):
            group.add_argument(f"--{f.name}", nargs="+", type=float, default=None, help=help_text)
        elif base is list or typing.get_origin(tp) is list or typing.get_origin(base) is list:
            item = (typing.get_args(base) or (str,))[0]  # list[float]: numbers (base_weights_multiplier)
            group.add_argument(f"--{f.name}", nargs="*", type=float if item is float else str, default=None,
                               help=help_text)
        else:
            conv = {int: int, float: float}.get(base, str)
            if f.name == "lr_warmup_steps":
                conv = str
            group.add_argument(f"--{f.name}", type=conv, default=None, help=help_text)
    return parser


def config_from_args(argv: list[str] | None = None, *, prog: str = "train_network.py",
                     fixed: dict | None = None) -> TrainConfig:
    """Settings from the command line (and ``--config_file``); ``fixed`` settings are the script's own
    (``sdxl`` for sdxl_train_network.py): given the other way, they are a one-line error."""
    from sd_scripts.core.errors import ConfigError

    args = build_parser(prog).parse_args(argv)
    values: dict = kohya_cli_defaults()  # kohya's defaults where the engine's differ (enable_bucket, caption_extension...)
    if args.config_file:
        import toml

        try:
            values.update(toml.load(args.config_file))
        except (OSError, toml.TomlDecodeError) as e:
            raise ConfigError(f"config_file: cannot read {args.config_file}: {e}") from None
        names = {f.name for f in config_fields()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config_file: unknown settings {', '.join(unknown)}")
    types = _resolved_types()
    for f in config_fields():
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v[0] if _numbers_or_number(types[f.name]) and len(v) == 1 else v
    if "lr_warmup_steps" in values and isinstance(values["lr_warmup_steps"], str):
        text = values["lr_warmup_steps"].strip()
        if not text.endswith("%"):
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ConfigError(f"lr_warmup_steps: {text!r} is not a number of steps, a ratio below 1 or N%")
            values["lr_warmup_steps"] = int(number) if number >= 1 else number
    for name, value in (fixed or {}).items():
        if values.get(name, value) != value:
            raise ConfigError(f"{name}: {prog} always uses {name}={value}; use train_network.py for other models")
        values[name] = value
    return TrainConfig(**values)


def kohya_cli_defaults() -> dict:
    """``{kohya name: kohya's default}`` for the settings whose kohya default differs from ``TrainConfig``'s."""
    from sd_scripts.core.setting import SAME
    from sd_scripts.core.settings import engine_settings

    return {s.kohya_name: s.kohya_cli_default for s in engine_settings() if s.kohya_cli_default is not SAME}


def _with_script_fix(err, prog: str, fixed: dict):
    """A setting this script fixes cannot be "unset": point to the general script instead."""
    from sd_scripts.core.errors import ConfigError, UserErrors

    def fix(e):
        if getattr(e, "setting", None) not in fixed:
            return e
        problem = str(e).split(";")[0]
        return ConfigError(f"{problem}; {prog} is for {e.setting}={fixed[e.setting]} models only, "
                           f"use train_network.py for this one", e.setting)

    errors = [fix(e) for e in (getattr(err, "errors", None) or [err])]
    return errors[0] if len(errors) == 1 else UserErrors(errors)


def main(argv: list[str] | None = None, *, prog: str = "train_network.py", fixed: dict | None = None) -> int:
    from sd_scripts.cli_common import run_cli
    from sd_scripts.core.errors import UserError

    def _run() -> int:
        from sd_scripts.training.callbacks import ConsoleCallbacks
        from sd_scripts.training.loop import train

        config = config_from_args(argv, prog=prog, fixed=fixed)
        try:
            result = train(config, ConsoleCallbacks())
        except UserError as err:
            raise _with_script_fix(err, prog, fixed or {}) from None
        if result.output_path:  # only the main process writes the file
            print(f"LoRA written: {result.output_path}")
        return 0

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
