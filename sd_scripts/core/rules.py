"""Rules between settings (conflicts, "needs"), declared once, and the checks of declared ranges and choices.

A :class:`Rule` names settings by their front-end names (``ArgsList.py``); where it is checked (``where``: the
front end's ``validate_store``, the engine's preflight, or both) the names and values are that layer's:
``{unet_only}`` in a message reads ``unet_only`` in ``main.py``'s message and ``network_train_unet_only`` in
kohya's command line. ``check_rules(values, layer, problems)`` records the broken ones;
``check_engine_values(config, problems, names)`` checks the engine's values against their declared ranges and
choices (the front end checks its own in ``frontend.resolve.validate_store``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError
from .setting import Range, is_number
from .settings import declared, declared_in_engine, engine_settings

__all__ = ["Rule", "RULES", "DATASET_RULES", "check_rules", "check_engine_values"]


class _Layer:
    """A settings object read by front-end names: ``values.unet_only`` is the engine's
    ``network_train_unet_only`` when ``engine`` is true."""

    def __init__(self, obj: Any, engine: bool):
        self._obj = obj
        self._engine = engine

    def name(self, front_name: str) -> str:
        return declared(front_name).kohya_name if self._engine else front_name

    def __getattr__(self, front_name: str) -> Any:
        return getattr(self._obj, self.name(front_name))


class _Names:
    def __init__(self, layer: _Layer):
        self._layer = layer

    def __getitem__(self, key: str) -> str:
        return self._layer.name(key)


@dataclass(frozen=True)
class Rule:
    """``setting`` gets the message ``text`` when ``broken(values)`` is true; ``{name}`` in ``text`` is replaced by
    that setting's name in the layer checked (``text`` may also be a function of the values and that mapping);
    ``engine_text``, where given, is the engine's wording of the same rule. A ``warning`` is a whole line, not
    prefixed by the setting."""

    setting: str
    text: str | Callable[[Any, Any], str]
    broken: Callable[[Any], bool]
    where: tuple[str, ...] = ("front", "engine")
    warning: bool = False
    whole_line: bool = False  # an error whose ``text`` is the whole line, naming the setting itself
    engine_text: str | None = None

    def message(self, layer: _Layer) -> str:
        names = _Names(layer)
        text = self.engine_text if layer._engine and self.engine_text else self.text
        text = text(layer, names) if callable(text) else text.format_map(names)
        return text if self.warning or self.whole_line else f"{names[self.setting]}: {text}"


def _sampling(v) -> bool:
    return bool(v.sample_every_n_steps or v.sample_every_n_epochs or v.sample_at_first)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _low(v) -> Any:
    return 0 if v.min_timestep is None else v.min_timestep


def _high(v) -> Any:
    return 1000 if v.max_timestep is None else v.max_timestep


_TIMESTEPS = Range(0, 1000, whole=True)


def _timesteps_fit(v) -> bool:
    return all(t is None or _TIMESTEPS.contains(t) for t in (v.min_timestep, v.max_timestep))


def _caches_latents(v) -> bool:
    return bool(v.cache_latents or v.cache_latents_to_disk)


def _cached_augmentation(key: str) -> str:
    return (f"{{cache_latents}} and {{{key}}} cannot be used together: cached latents cannot change every step; "
            f"turn off {{{key}}} or {{cache_latents}}")


# checked by the dataset scan too, which runs without preflight (the dataset report, the wizard's dataset check)
DATASET_RULES: tuple[Rule, ...] = (
    Rule("cache_latents", _cached_augmentation("color_aug"), lambda v: _caches_latents(v) and v.color_aug,
         where=("engine",), whole_line=True),
    Rule("cache_latents", _cached_augmentation("random_crop"), lambda v: _caches_latents(v) and v.random_crop,
         where=("engine",), whole_line=True),
)

_PICK_ONE = "cannot be combined with {%s}; pick one"
_NEEDS_FP8 = "needs {mixed_precision} fp16 or bf16 (float8 weights are computed in the mixed precision)"
_NOT_WITH_RESUME = "cannot be combined with {resume} (the state holds the step to continue from); remove one"

RULES: tuple[Rule, ...] = (
    # ----------------------------------------------------------------------------- the front end
    Rule("min_bucket_resolution",
         lambda v, n: f"{v.min_bucket_resolution} is above {n['max_bucket_resolution']} {v.max_bucket_resolution}",
         lambda v: v.min_bucket_resolution > v.max_bucket_resolution, where=("front",)),
    Rule("unet_only", _PICK_ONE % "text_only", lambda v: v.unet_only and v.text_only),
    Rule("random_crop", "needs {cache_latents} false (the cached latents cannot be re-cropped or re-coloured)",
         lambda v: v.cache_latents and v.random_crop, where=("front",)),
    Rule("color_aug", "needs {cache_latents} false (the cached latents cannot be re-cropped or re-coloured)",
         lambda v: v.cache_latents and v.color_aug and not v.random_crop, where=("front",)),
    Rule("sample_prompts", "sample images are asked for (sample_every_n_*/sample_at_first) but no prompt file is set",
         lambda v: _sampling(v) and not v.sample_prompts,
         engine_text="sampling is on (sample_every_n_*/sample_at_first) but no prompt file is given; set "
         "{sample_prompts}"),
    # ----------------------------------------------------------------------------- the engine
    Rule("dim_from_weights", "needs {lora_model_for_resume} (the LoRA file whose dim and alpha are used); set it or "
         "turn {dim_from_weights} off", lambda v: v.dim_from_weights and not v.lora_model_for_resume, where=("engine",)),
    Rule("full_fp16", "needs {mixed_precision} fp16", lambda v: v.full_fp16 and v.mixed_precision != "fp16",
         where=("engine",)),
    Rule("full_bf16", "needs {mixed_precision} bf16", lambda v: v.full_bf16 and v.mixed_precision != "bf16",
         where=("engine",)),
    Rule("full_fp16", _PICK_ONE % "full_bf16", lambda v: v.full_fp16 and v.full_bf16, where=("engine",)),
    Rule("fp8_base", _NEEDS_FP8, lambda v: v.fp8_base and v.mixed_precision not in ("fp16", "bf16"),
         where=("engine",)),
    Rule("fp8_base_unet", _NEEDS_FP8, lambda v: v.fp8_base_unet and v.mixed_precision not in ("fp16", "bf16"),
         where=("engine",)),
    Rule("cpu_offload_checkpointing", "moves the checkpointed activations to the CPU, so it needs "
         "{gradient_checkpointing}; turn {gradient_checkpointing} on",
         lambda v: v.cpu_offload_checkpointing and not v.gradient_checkpointing),
    Rule("initial_step", lambda v, n: f"{v.initial_step} is not below {n['max_steps']} {v.max_steps}; raise "
         f"{n['max_steps']} or start earlier",
         lambda v: _whole(v.initial_step) and v.initial_step >= 0 and v.num_epochs is None and _whole(v.max_steps)
         and v.initial_step >= v.max_steps, where=("engine",)),
    Rule("initial_epoch", lambda v, n: f"{v.initial_epoch} is after the last epoch ({v.num_epochs}); raise "
         f"{n['num_epochs']} or start earlier",
         lambda v: _whole(v.initial_epoch) and v.initial_epoch >= 1 and v.initial_step is None
         and _whole(v.num_epochs) and v.initial_epoch > v.num_epochs, where=("engine",)),
    Rule("initial_step", _NOT_WITH_RESUME, lambda v: v.resume and v.initial_step is not None, where=("engine",)),
    Rule("initial_epoch", _NOT_WITH_RESUME,
         lambda v: v.resume and v.initial_step is None and v.initial_epoch is not None, where=("engine",)),
    Rule("adaptive_noise_scale", "needs {noise_offset} (the scaled latent mean is added to the offset); set "
         "{noise_offset}, e.g. 0.05, or leave {adaptive_noise_scale} unset",
         lambda v: is_number(v.adaptive_noise_scale) and not v.noise_offset, where=("engine",)),
    Rule("min_timestep", lambda v, n: f"{_low(v)} is above {n['max_timestep']} {_high(v)}; timesteps are drawn from "
         f"{n['min_timestep']} up to below {n['max_timestep']} (equal values train one constant timestep)",
         lambda v: _timesteps_fit(v) and _low(v) > _high(v), where=("engine",)),
    Rule("min_timestep", "a constant timestep ({min_timestep} = {max_timestep}) must be 999 or lower; the schedule "
         "has timesteps 0 to 999", lambda v: _timesteps_fit(v) and _low(v) == _high(v) == 1000, where=("engine",)),
    Rule("noise_offset_random_strength", "{noise_offset_random_strength} has no effect without {noise_offset}",
         lambda v: v.noise_offset_random_strength and not v.noise_offset, where=("engine",), warning=True),
    Rule("ip_noise_gamma_random_strength", "{ip_noise_gamma_random_strength} has no effect without {ip_noise_gamma}",
         lambda v: v.ip_noise_gamma_random_strength and not v.ip_noise_gamma, where=("engine",), warning=True),
    *DATASET_RULES,
)


def check_rules(values: Any, layer: str, problems: Any, rules: tuple[Rule, ...] = RULES) -> None:
    """Record every rule checked in ``layer`` ("front" or "engine") that ``values`` break."""
    view = _Layer(values, engine=layer == "engine")
    for rule in rules:
        if layer in rule.where and rule.broken(view):
            if rule.warning:
                problems.warn(rule.message(view))
            elif rule.whole_line:
                problems.add(ConfigError(rule.message(view), view.name(rule.setting)))
            else:
                problems.error(view.name(rule.setting), rule.message(view).split(": ", 1)[1])


def check_engine_values(config: Any, problems: Any, names: Any = None) -> None:
    """Check the engine's values (kohya names ``names``; default: every engine setting) against the declared
    ranges and choices."""
    for name in names if names is not None else [s.kohya_name for s in engine_settings()]:
        problem = declared_in_engine(name).engine_problem(getattr(config, name))  # the settings named by names
        if problem:
            problems.error(name, problem)
