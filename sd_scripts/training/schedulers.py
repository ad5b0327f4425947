"""Learning-rate schedulers, kohya-compatible (``train_util.get_scheduler_fix``).

``build_lr_scheduler(config, optimizer, num_training_steps, num_processes=1, warnings=None)``
    ``num_training_steps`` is the number of optimizer steps (``max_train_steps``). When the scheduler is
    wrapped by ``accelerator.prepare`` it is stepped ``num_processes`` times per optimizer step, so pass
    ``num_processes=accelerator.num_processes``: the schedule then spans
    ``num_training_steps * num_processes`` scheduler steps, and **both** warm-up forms are scaled to match
    (a ratio of the whole run, and an integer count of optimizer steps). kohya scales only the ratio form;
    scaling the integer too keeps ``lr_warmup_steps 100`` meaning 100 optimizer steps on any GPU count.
    Passing ``num_training_steps=max_train_steps * num_processes`` with ``num_processes=1`` gives kohya's
    behaviour exactly.
``check_scheduler_settings(config, optimizer_type=None, adafactor_relative_step=False) -> list[str]``
    preflight part (called by ``optimizers.check_optimizer_settings``); imports nothing heavy.
``resolve_warmup_steps(value, num_training_steps, num_processes=1, setting="lr_warmup_steps") -> int``
``scheduler_names() -> list[str]``

Names: ``linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt,
cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay`` (transformers formulas),
``piecewise_constant`` (diffusers; ``lr_scheduler_args step_rules="1:100,0.5:200,0.1"``) and ``adafactor``
(only with optimizer AdaFactor, relative_step=True; chosen automatically then). ``lr_scheduler_args`` are
passed to the schedule function as extra keyword arguments and override the values we derive.
``lr_scheduler_type`` (a ``torch.optim.lr_scheduler`` class name, or ``package.module.Class``) with
``lr_scheduler_args`` replaces ``lr_scheduler``; it has no warm-up.
Warm-up (``lr_warmup_steps``) and decay (``lr_decay_steps``, for warmup_stable_decay) may be an int,
a float ratio < 1 of the run, or a string ``"N%"``. ``constant`` and ``adafactor`` reject a warm-up.
Settings kohya has but ``TrainConfig`` may lack are read with ``getattr`` and defaults:
``lr_decay_steps`` (0), ``lr_scheduler_timescale`` (None = warm-up), ``lr_scheduler_min_lr_ratio`` (None).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.training.kv_args import emit_warnings, is_schedule_free, parse_kv_args

__all__ = [
    "build_lr_scheduler",
    "check_scheduler_settings",
    "resolve_warmup_steps",
    "scheduler_names",
    "TRANSFORMERS_SCHEDULERS",
]

# transformers.SchedulerType values we support (kept in sync by a test against the installed transformers)
TRANSFORMERS_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
# transformers schedulers that need a validation metric in step(); this trainer has none
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
DIFFUSERS_SCHEDULERS = ("piecewise_constant",)
_NO_WARMUP = ("constant", "adafactor")
_DERIVED_KEYS = ("optimizer", "num_warmup_steps", "num_training_steps")


def scheduler_names() -> list[str]:
    return list(TRANSFORMERS_SCHEDULERS) + list(DIFFUSERS_SCHEDULERS) + ["adafactor"]


# --------------------------------------------------------------------------------------------
# steps given as int / ratio / "N%"
# --------------------------------------------------------------------------------------------


def _steps_value(value: Any, setting: str) -> int | float:
    """Validate a steps setting; returns an int (steps) or a float ratio in [0, 1)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ConfigError(f"{setting}: {value} is not a number of steps; give steps (100), a ratio (0.05) or a percentage (\"5%\")", setting)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ConfigError(f'{setting}: "{value}" is not a percentage; write e.g. "5%"', setting) from None
            if not 0 <= pct <= 100:
                raise ConfigError(f'{setting}: "{value}" must be between 0% and 100%', setting)
            return pct / 100.0 if pct < 100 else 1.0
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f'{setting}: "{value}" is not a number of steps; give steps (100), a ratio (0.05) or a percentage ("5%")', setting) from None
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{setting}: {value} is negative; give 0 or more steps", setting)
        return value
    if isinstance(value, float):
        if math.isnan(value) or value < 0:
            raise ConfigError(f"{setting}: {value} is negative; give 0 or more steps, or a ratio below 1", setting)
        if value < 1:
            return value
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{setting}: {value} is neither whole steps nor a ratio below 1; write e.g. {int(value)} or 0.05", setting)
    raise ConfigError(f"{setting}: {value!r} is not a number of steps; give steps (100), a ratio (0.05) or a percentage (\"5%\")", setting)


def resolve_warmup_steps(value: Any, num_training_steps: int, num_processes: int = 1, setting: str = "lr_warmup_steps") -> int:
    """Scheduler steps for a warm-up/decay setting: int x num_processes, or ratio x training x processes."""
    v = _steps_value(value, setting)
    total = int(num_training_steps) * int(num_processes)
    if isinstance(v, float):
        return int(v * total)
    return int(v) * int(num_processes)


def _is_nonzero(value: Any, setting: str) -> bool:
    return _steps_value(value, setting) != 0


# --------------------------------------------------------------------------------------------
# custom scheduler classes
# --------------------------------------------------------------------------------------------


def _custom_scheduler_class(type_name: str, import_heavy: bool = True):
    type_name = type_name.strip()
    if "." not in type_name:
        import torch.optim.lr_scheduler as module

        cls = getattr(module, type_name, None)
        if cls is None:
            matches = [n for n in dir(module) if n.lower() == type_name.lower() and inspect.isclass(getattr(module, n))]
            cls = getattr(module, matches[0]) if len(matches) == 1 else None
        if cls is None or not inspect.isclass(cls):
            raise ConfigError(
                f"lr_scheduler_type: torch.optim.lr_scheduler has no {type_name}; use a class such as StepLR, CosineAnnealingLR, OneCycleLR, or package.module.Class",
                "lr_scheduler_type",
            )
        return cls
    module_name, _, cls_name = type_name.rpartition(".")
    if not import_heavy and module_name.split(".")[0] in ("transformers", "diffusers", "bitsandbytes"):
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            raise ConfigError(f"lr_scheduler_type {type_name}: package {module_name.split('.')[0]} is not installed; install it or fix the name", "lr_scheduler_type")
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"lr_scheduler_type {type_name}: cannot import {module_name} ({e}); install its package or fix the name", "lr_scheduler_type") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not callable(cls):
        raise ConfigError(f"lr_scheduler_type {type_name}: {module_name} has no {cls_name}; fix the name", "lr_scheduler_type")
    return cls


def _check_kwargs_against(func, kwargs: dict, what: str, skip: tuple = ()) -> None:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    valid = sorted(accepted - {"self", "optimizer", "last_epoch", *skip})
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"lr_scheduler_args: {what} has no argument {key}; valid: {', '.join(valid) or 'none'}", "lr_scheduler_args")


# --------------------------------------------------------------------------------------------
# preflight
# --------------------------------------------------------------------------------------------


def _validate_step_rules(rules: Any) -> None:
    example = 'write e.g. step_rules="1:100,0.5:200,0.1" (lr multiple:until step, ..., final multiple)'
    if not isinstance(rules, str):
        raise ConfigError(f"lr_scheduler_args: step_rules must be text; {example}", "lr_scheduler_args")
    parts = [p.strip() for p in rules.split(",")]
    try:
        for part in parts[:-1]:
            value, steps = part.split(":")
            float(value)
            int(steps)
        float(parts[-1])
    except ValueError:
        raise ConfigError(f'lr_scheduler_args: step_rules "{rules}" is malformed; {example}', "lr_scheduler_args") from None


def _undeclared(config: TrainConfig, name: str, default: Any = None) -> Any:
    """A kohya scheduler setting TrainConfig does not declare (``lr_decay_steps``, ``lr_scheduler_min_lr_ratio``,
    ``lr_scheduler_timescale``: not taken from the command line, tests/test_kohya_cli_defaults.py): there only when a
    library caller set it on the config, so it is read with getattr."""
    return getattr(config, name, default)


def _min_lr_given(config: TrainConfig, kwargs: dict) -> bool:
    return (
        _undeclared(config, "lr_scheduler_min_lr_ratio") is not None
        or kwargs.get("min_lr") is not None
        or kwargs.get("min_lr_rate") is not None
    )


def _name(config: TrainConfig) -> str:
    return (config.lr_scheduler or "constant").strip().lower()


def check_scheduler_settings(config: TrainConfig, optimizer_type: str | None = None, adafactor_relative_step: bool = False) -> list[str]:
    """Preflight for scheduler settings: returns warnings; raises ConfigError / UserErrors."""
    found = Problems()
    kwargs = _attempt(found, parse_kv_args, config.lr_scheduler_args, "lr_scheduler_args") or {}
    warmup = _attempt(found, _steps_value, config.lr_warmup_steps, "lr_warmup_steps")
    decay = _attempt(found, _steps_value, _undeclared(config, "lr_decay_steps", 0), "lr_decay_steps")
    name = _name(config)
    custom = (config.lr_scheduler_type or "").strip()
    schedule_free = bool(optimizer_type) and optimizer_type.lower().endswith("schedulefree")

    for key in _DERIVED_KEYS:
        if key in kwargs:
            fix = {"num_warmup_steps": "set lr_warmup_steps", "num_training_steps": "it comes from max_train_steps"}.get(key, "remove it")
            found.error("lr_scheduler_args", f"{key} is not allowed there; {fix}")

    if schedule_free:
        if name != "constant" or custom or warmup:
            found.warn(
                f"lr_scheduler {custom or name} and lr_warmup_steps are ignored: optimizer_type {optimizer_type} needs no schedule "
                "(use optimizer_args warmup_steps=N for its warm-up)"
            )
    elif custom:
        if warmup:
            found.error("lr_warmup_steps", f"lr_scheduler_type {custom} has no warm-up; set lr_warmup_steps 0")
        cls = _attempt(found, _custom_scheduler_class, custom, import_heavy=False)
        if cls is not None:
            _attempt(found, _check_kwargs_against, cls, kwargs, custom)
    elif adafactor_relative_step:
        if warmup:
            found.error("lr_warmup_steps", "AdaFactor with relative_step=True has its own schedule without warm-up; set "
                        "lr_warmup_steps 0 (or optimizer_args warmup_init=True)")
    else:
        _check_named_scheduler(config, name, kwargs, warmup, decay, found)
    found.raise_errors(one_as_is=True)
    return found.warnings


def _attempt(found: Problems, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None with its ConfigError recorded in ``found``."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        found.add(e)
        return None


def _check_named_scheduler(config: TrainConfig, name: str, kwargs: dict, warmup, decay, found: Problems) -> None:
    """``lr_scheduler`` by name (transformers' and diffusers' schedulers) with its warm-up and arguments."""
    base = name.split(":")[0]
    if base == "adafactor":
        found.error("lr_scheduler", "adafactor only works with optimizer_type AdaFactor (relative_step=True); pick "
                    "another lr_scheduler such as constant or cosine")
        return
    if name in METRIC_SCHEDULERS:
        found.error("lr_scheduler", f"{name} needs a validation metric, which this trainer does not compute; pick "
                    "another, e.g. cosine")
        return
    if name not in TRANSFORMERS_SCHEDULERS and name not in DIFFUSERS_SCHEDULERS:
        found.error("lr_scheduler", f"unknown scheduler {config.lr_scheduler}; valid: {', '.join(scheduler_names())}")
        return
    if name == "constant" and warmup:
        found.error("lr_warmup_steps", "lr_scheduler constant has no warm-up; set lr_warmup_steps 0 or use "
                    "lr_scheduler constant_with_warmup")
    if name == "piecewise_constant":
        if "step_rules" not in kwargs:
            found.error("lr_scheduler_args", 'piecewise_constant needs step_rules, e.g. step_rules="1:100,0.5:200,0.1"')
        else:
            _attempt(found, _validate_step_rules, kwargs["step_rules"])
        if warmup:
            found.warn("lr_warmup_steps is ignored by lr_scheduler piecewise_constant (put a warm-up into step_rules)")
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and not _min_lr_given(config, kwargs):
        found.error("lr_scheduler_args", f"{name} needs a minimum lr; add min_lr_rate=0.1 (a ratio of the lr) or "
                    "min_lr=1e-6")
    if name == "warmup_stable_decay" and not decay:
        found.warn("lr_scheduler warmup_stable_decay with lr_decay_steps 0 never decays; set lr_decay_steps (steps, a "
                   "ratio or N%)")


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def _constant_scheduler(optimizer):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda _: 1.0)


def _is_relative_step_adafactor(optimizer) -> bool:
    cls = type(optimizer)
    return cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers") and bool(optimizer.defaults.get("relative_step"))


def _adafactor_schedule(optimizer, initial_lr: float):
    """transformers' ``AdafactorSchedule`` with one lr per parameter group.

    transformers reports lrs only for the groups whose first parameter got a gradient, so when some parameters sit a
    step out (DyLoRA trains one rank slice at a time) it returns fewer lrs than groups and torch's LambdaLR raises.
    Here each group reports the lr of its first parameter that has optimizer state, else the starting lr."""
    from transformers.optimization import AdafactorSchedule

    class _PerGroupAdafactorSchedule(AdafactorSchedule):
        def get_lr(self):
            opt = self.optimizer
            lrs = []
            for group, base in zip(opt.param_groups, self.base_lrs):
                state = next((opt.state[p] for p in group["params"] if opt.state.get(p)), None)
                lrs.append(opt._get_lr(group, state) if state else base)
            return lrs

    return _PerGroupAdafactorSchedule(optimizer, initial_lr)


def build_lr_scheduler(config: TrainConfig, optimizer, num_training_steps: int, num_processes: int = 1, warnings: list[str] | None = None):
    """Create the lr scheduler for ``optimizer`` (see the module docstring for the step units).

    Warnings go to ``warnings`` when a list is given, else to the log. Raises ConfigError on bad settings.
    """

    found: list[str] = []
    kwargs = parse_kv_args(config.lr_scheduler_args, "lr_scheduler_args")
    total = int(num_training_steps) * int(num_processes)
    relative = _is_relative_step_adafactor(optimizer)
    schedule_free = is_schedule_free(optimizer)
    found.extend(check_scheduler_settings(config, type(optimizer).__name__ if schedule_free else None, adafactor_relative_step=relative))
    num_warmup = resolve_warmup_steps(config.lr_warmup_steps, num_training_steps, num_processes, "lr_warmup_steps")
    num_decay = resolve_warmup_steps(_undeclared(config, "lr_decay_steps", 0), num_training_steps, num_processes, "lr_decay_steps")
    name = _name(config)
    custom = (config.lr_scheduler_type or "").strip()

    if schedule_free:
        sched = _constant_scheduler(optimizer)
    elif custom:
        cls = _custom_scheduler_class(custom)
        _check_kwargs_against(cls, kwargs, custom)
        try:
            sched = cls(optimizer, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lr_scheduler_args: {custom} rejected the settings ({' '.join(str(e).split())}); fix lr_scheduler_args", "lr_scheduler_args") from None
    elif relative:
        initial_lr = config.learning_rate or 0.0
        if name.startswith("adafactor:"):
            try:
                initial_lr = float(name.split(":", 1)[1])
            except ValueError:
                pass
        sched = _adafactor_schedule(optimizer, initial_lr)
    elif name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        rules = kwargs.pop("step_rules")
        _check_kwargs_against(get_piecewise_constant_schedule, kwargs, name)
        sched = get_piecewise_constant_schedule(optimizer, step_rules=rules, **kwargs)
    else:
        sched = _transformers_scheduler(config, name, optimizer, kwargs, num_warmup, num_decay, total, found)

    if num_warmup > total and total > 0:
        found.append(f"lr_warmup_steps ({num_warmup}) is longer than the training ({total} scheduler steps); the lr never reaches learning_rate")
    emit_warnings(found, warnings)
    return sched


def _transformers_scheduler(config: TrainConfig, name, optimizer, kwargs, num_warmup, num_decay, total, found):
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise ConfigError(f"lr_scheduler: {name} is not available in the installed transformers; valid: {', '.join(scheduler_names())}", "lr_scheduler") from None
    num_cycles = config.lr_scheduler_num_cycles or 1
    power = config.lr_scheduler_power
    min_lr_ratio = _undeclared(config, "lr_scheduler_min_lr_ratio")
    derived: dict[str, Any] = {}
    if name != "constant":
        derived["num_warmup_steps"] = num_warmup
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        derived["num_training_steps"] = total
    if name == "cosine_with_restarts":
        derived["num_cycles"] = int(num_cycles)
    elif name == "polynomial":
        derived["power"] = float(power if power is not None else 1.0)
    elif name == "inverse_sqrt":
        timescale = _undeclared(config, "lr_scheduler_timescale")
        if timescale is not None:
            derived["timescale"] = int(timescale)
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        derived["num_cycles"] = num_cycles / 2
        if min_lr_ratio is not None and "min_lr" not in kwargs:
            derived["min_lr_rate"] = float(min_lr_ratio)
    elif name == "warmup_stable_decay":
        stable = total - num_warmup - num_decay
        if stable < 0:
            raise ConfigError(
                f"lr_decay_steps: warm-up ({num_warmup}) plus decay ({num_decay}) is longer than the training ({total} steps); shorten lr_warmup_steps or lr_decay_steps",
                "lr_decay_steps",
            )
        derived.update(num_stable_steps=stable, num_decay_steps=num_decay, num_cycles=num_cycles / 2,
                       min_lr_ratio=float(min_lr_ratio) if min_lr_ratio is not None else 0.0)
    _check_kwargs_against(func, kwargs, name, skip=_DERIVED_KEYS)
    call = {**derived, **kwargs}
    try:
        return func(optimizer, **call)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lr_scheduler_args: {name} rejected the settings ({' '.join(str(e).split())}); fix lr_scheduler_args", "lr_scheduler_args") from None
