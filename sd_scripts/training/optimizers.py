"""Optimizers, kohya-compatible: names, ``optimizer_args`` and the ``ss_optimizer`` metadata string.

Public API
----------
``parse_kv_args(items, setting_name) -> dict``
    ``optimizer_args`` / ``lr_scheduler_args`` / ``network_args``-style ``key=value`` settings to kwargs.
``check_optimizer_settings(config) -> list[str]``
    preflight: returns warnings; raises ``ConfigError`` (one problem) or ``UserErrors`` (several).
    Also checks the scheduler settings (see :mod:`.schedulers`). Imports nothing heavy: bitsandbytes and
    transformers are only looked up (``find_spec``), never imported.
``build_optimizer(config, param_groups, warnings=None) -> OptimizerBuild``
    ``OptimizerBuild`` has ``.optimizer``, ``.ss_optimizer``, ``.warnings`` and ``.optimizer_type``, and unpacks
    as ``opt, name = build_optimizer(...)``. Warnings also go to ``warnings`` when a list is given; otherwise
    they are logged (logger ``sd_scripts.training.optimizers``).
``build_lr_scheduler(config, optimizer, num_training_steps, num_processes=1, warnings=None)``
    see :mod:`.schedulers`.
``optimizer_names() -> list[str]``; ``is_schedule_free(optimizer) -> bool``.

Names (case-insensitive) follow kohya-ss/sd-scripts HEAD (``train_util.get_optimizer``):

* ``AdamW`` (default; also ``""``), ``SGDNesterov`` (torch, ``nesterov=True``, momentum 0.9 unless given);
* bitsandbytes: ``AdamW8bit``, ``PagedAdamW8bit``, ``PagedAdamW``, ``PagedAdamW32bit``, ``Lion8bit``,
  ``PagedLion8bit``, ``SGDNesterov8bit`` (``SGD8bit``, nesterov, momentum 0.9). They run on CPU tensors too;
  paged ones fall back to non-paged there;
* ``Lion`` (lion_pytorch);
* D-Adaptation: ``DAdaptation`` = ``DAdaptAdamPreprint`` (``dadaptation.experimental``, as kohya HEAD; kohya of
  April 2023 used ``DAdaptAdam`` for this name), ``DAdaptAdam``, ``DAdaptLion``, ``DAdaptAdaGrad``, ``DAdaptSGD``,
  ``DAdaptAdan``, ``DAdaptAdanIP``. Where the class takes ``decouple`` (DAdaptAdam, DAdaptAdamPreprint) we pass
  ``decouple=True`` unless ``optimizer_args`` says otherwise (AdamW-style weight decay; this project's choice,
  kohya passes the library default False);
  Learning-rate-free optimizers (DAdapt*, Prodigy) warn when an lr is <= 0.1 (use about 1.0). DAdaptAdam,
  DAdaptation/DAdaptAdamPreprint, DAdaptLion, DAdaptSGD and Prodigy fail inside ``step()`` when parameter groups
  have different non-zero lrs, so that is a ``ConfigError`` (setting ``text_encoder_lr``) here, before training;
  DAdaptAdaGrad/DAdaptAdan/DAdaptAdanIP use the first group's lr, which is a warning;
* ``Prodigy`` (prodigyopt); ``AdaFactor`` (``transformers.optimization.Adafactor``, kohya's relative_step rules);
* ``RAdamScheduleFree``, ``AdamWScheduleFree``, ``SGDScheduleFree`` (schedulefree package, if installed);
* any ``torch.optim`` class name (``Adam``, ``RAdam``, ``NAdam``...; case-insensitive), or ``package.module.Class``.

Legacy flags: ``use_8bit_adam`` -> AdamW8bit, ``use_lion_optimizer`` -> Lion (only with optimizer_type AdamW/empty).

``optimizer_args`` values go through ``ast.literal_eval`` (never ``eval``): ``betas=0.9,0.99`` is a tuple,
``decouple=True`` a bool. A value that is not a Python literal is a ``ConfigError`` (quote strings:
``key="text"``), except for keys known to take free text (``step_rules``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import logging
from typing import Any

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.training.kv_args import emit_warnings, is_schedule_free, parse_kv_args
from sd_scripts.training.speed import optimizer_speed_kwargs

__all__ = [
    "parse_kv_args",
    "check_optimizer_settings",
    "build_optimizer",
    "build_lr_scheduler",
    "OptimizerBuild",
    "optimizer_names",
    "resolve_optimizer_type",
    "is_schedule_free",
    "is_lr_free",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# optimizer names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str  # display name
    module: str
    cls: str
    package: str  # pip name, for messages
    fixed: tuple = ()  # kwargs always passed, not shown in ss_optimizer (kohya: nesterov=True)
    defaults: tuple = ()  # kwargs passed unless given, shown in ss_optimizer


_BNB = "bitsandbytes"
_SPECS: dict[str, _Spec] = {
    s.name.lower(): s
    for s in [
        _Spec("AdamW", "torch.optim", "AdamW", "torch"),
        _Spec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", _BNB),
        _Spec("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", _BNB),
        _Spec("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", _BNB),
        _Spec("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", _BNB),
        _Spec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        _Spec("Lion8bit", "bitsandbytes.optim", "Lion8bit", _BNB),
        _Spec("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", _BNB),
        _Spec("SGDNesterov", "torch.optim", "SGD", "torch", fixed=(("nesterov", True),), defaults=(("momentum", 0.9),)),
        _Spec("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", _BNB, fixed=(("nesterov", True),), defaults=(("momentum", 0.9),)),
        _Spec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        _Spec("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        _Spec("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
        _Spec("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
        _Spec("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
        _Spec("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
        _Spec("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
        _Spec("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
        _Spec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
        _Spec("AdaFactor", "transformers.optimization", "Adafactor", "transformers"),
        _Spec("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree", "schedulefree"),
        _Spec("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
        _Spec("SGDScheduleFree", "schedulefree", "SGDScheduleFree", "schedulefree"),
    ]
}

# torch.optim classes that cannot run in a plain training loop
_TORCH_UNSUITABLE = {
    "optimizer": "it is the abstract base class",
    "lbfgs": "it needs a closure in step()",
    "sparseadam": "it only works with sparse gradients",
}


def optimizer_names() -> list[str]:
    """The named optimizers (besides any torch.optim class and package.module.Class)."""
    return [s.name for s in _SPECS.values()]


def _names_line() -> str:
    return ", ".join(optimizer_names()) + ", any torch.optim class (Adam, RAdam...) or package.module.Class"


def _legacy_type(config: TrainConfig, found: Problems, collect_conflicts: bool) -> str:
    """The optimizer type after applying use_8bit_adam / use_lion_optimizer; conflicts raise (``collect_conflicts``:
    are recorded in ``found``), the deprecation warning goes to ``found``."""
    opt_type = (config.optimizer_type or "").strip()
    use_8bit = bool(config.use_8bit_adam)
    use_lion = bool(config.use_lion_optimizer)

    def fail(msg: str, setting: str) -> None:
        err = ConfigError(msg, setting)
        if not collect_conflicts:
            raise err
        found.add(err)

    if use_8bit and use_lion:
        fail("use_8bit_adam and use_lion_optimizer are both set; keep one, or better set optimizer_type AdamW8bit or Lion", "use_8bit_adam")
        return opt_type or "AdamW"
    if use_8bit or use_lion:
        flag, target = ("use_8bit_adam", "AdamW8bit") if use_8bit else ("use_lion_optimizer", "Lion")
        if opt_type.lower() not in ("", "adamw", target.lower()):
            fail(f"{flag} conflicts with optimizer_type {opt_type}; remove {flag} (it means optimizer_type {target})", flag)
            return opt_type
        found.warn(f"{flag} is deprecated; set optimizer_type {target} instead")
        return target
    return opt_type or "AdamW"


@dataclasses.dataclass
class _Resolved:
    display: str
    spec: _Spec | None  # a named optimizer
    module: str | None  # where the class lives (None for torch.optim lookups until imported)
    cls_name: str | None
    package: str | None


def resolve_optimizer_type(opt_type: str) -> _Resolved:
    """Map an optimizer_type to where its class lives, without importing heavy packages.

    Raises ConfigError for an unknown name. torch.optim names need ``import torch``.
    """
    opt_type = (opt_type or "AdamW").strip()
    low = opt_type.lower()
    if low in _SPECS:
        s = _SPECS[low]
        return _Resolved(s.name, s, s.module, s.cls, s.package)
    if "." in opt_type:
        module, _, cls_name = opt_type.rpartition(".")
        if not module or not cls_name:
            raise ConfigError(f"optimizer_type: {opt_type} is not package.module.Class; valid names: {_names_line()}", "optimizer_type")
        return _Resolved(opt_type, None, module, cls_name, module.split(".")[0])
    import torch.optim

    if low in _TORCH_UNSUITABLE:
        raise ConfigError(f"optimizer_type: torch.optim.{opt_type} cannot train here because {_TORCH_UNSUITABLE[low]}; pick AdamW or another optimizer", "optimizer_type")
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if name.lower() == low and inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer):
            return _Resolved(name, None, "torch.optim", name, "torch")
    raise ConfigError(f"optimizer_type: unknown optimizer {opt_type}; valid names: {_names_line()}", "optimizer_type")


def _missing_package_error(r: _Resolved) -> ConfigError:
    if r.package == _BNB:
        return ConfigError(
            f"optimizer_type {r.display} needs the bitsandbytes package, which is not installed or cannot load here; "
            "install bitsandbytes or set optimizer_type AdamW",
            "optimizer_type",
        )
    return ConfigError(
        f"optimizer_type {r.display} needs the {r.package} package, which is not installed; run pip install {r.package} or set optimizer_type AdamW",
        "optimizer_type",
    )


def _package_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _import_class(r: _Resolved):
    """Import the optimizer class; missing packages become ConfigError."""
    try:
        mod = importlib.import_module(r.module)
    except ImportError as e:
        if r.spec is None and r.module != "torch.optim":
            raise ConfigError(f"optimizer_type {r.display}: cannot import {r.module} ({e}); install its package or fix the name", "optimizer_type") from None
        raise _missing_package_error(r) from None
    except Exception as e:  # bitsandbytes raises RuntimeError and friends when its native library cannot load
        raise ConfigError(f"optimizer_type {r.display}: importing {r.module} failed ({type(e).__name__}: {e}); set optimizer_type AdamW", "optimizer_type") from None
    cls = getattr(mod, r.cls_name, None)
    if cls is None and r.spec is None:
        # tolerate case differences in the class name
        matches = [n for n in dir(mod) if n.lower() == r.cls_name.lower()]
        cls = getattr(mod, matches[0]) if len(matches) == 1 else None
    if cls is None or not callable(cls):
        raise ConfigError(f"optimizer_type {r.display}: {r.module} has no class {r.cls_name}; fix the name", "optimizer_type")
    return cls


def is_lr_free(display_name: str) -> bool:
    low = display_name.lower()
    return low.startswith("dadapt") or low == "prodigy"


# --------------------------------------------------------------------------------------------
# rules shared by preflight and build
# --------------------------------------------------------------------------------------------


def _accepted_kwargs(cls) -> set[str] | None:
    """Keyword names the class accepts, or None when it takes **kwargs or has no readable signature."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


def _check_arg_names(kwargs: dict, display: str, cls) -> None:
    for key in ("params", "lr"):
        if key in kwargs:
            fix = "set learning_rate (and unet_lr / text_encoder_lr) instead" if key == "lr" else "remove it"
            raise ConfigError(f"optimizer_args: {key}= is not allowed there; {fix}", "optimizer_args")
    accepted = _accepted_kwargs(cls)
    if accepted is None:
        return
    valid = sorted(accepted - {"self", "params", "lr"})
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"optimizer_args: {display} has no argument {key}; valid: {', '.join(valid)}", "optimizer_args")


def _adafactor_rules(kwargs: dict, config: TrainConfig, found: Problems) -> bool:
    """kohya's AdaFactor handling: fills relative_step in kwargs, adds warnings; returns relative_step."""
    if "relative_step" not in kwargs:
        kwargs["relative_step"] = True
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        found.warn("optimizer_args: AdaFactor warmup_init=True needs relative_step=True, so relative_step is set to True")
        kwargs["relative_step"] = True
    scheduler = (config.lr_scheduler or "").lower()
    if kwargs["relative_step"]:
        if config.unet_lr is not None or config.text_encoder_lr is not None:
            found.warn("unet_lr and text_encoder_lr are ignored by AdaFactor with relative_step=True (it computes its own step size)")
        if scheduler not in ("", "constant", "adafactor") and not config.lr_scheduler_type:
            found.warn(
                f"lr_scheduler {config.lr_scheduler} is replaced by AdaFactor's own schedule (relative_step=True); "
                "for a schedule set optimizer_args relative_step=False scale_parameter=False warmup_init=False"
            )
    else:
        if float(config.max_grad_norm or 0.0) != 0.0:
            found.warn("AdaFactor with relative_step=False clips its own updates; consider max_grad_norm 0")
        if scheduler != "constant_with_warmup":
            found.warn("AdaFactor with relative_step=False works best with lr_scheduler constant_with_warmup")
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            found.warn("AdaFactor: optimizer_args clip_threshold=1.0 is recommended")
    return bool(kwargs["relative_step"])


# these raise RuntimeError in step() when param groups have different non-zero lrs
_ONE_LR_ONLY = frozenset({"dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion", "dadaptsgd", "prodigy"})


def _lr_free_rules(display: str, lrs: list, found: Problems) -> None:
    """Rules for learning-rate-free optimizers (DAdapt*, Prodigy): lr near 1, one lr for all groups."""
    lrs = [float(x) for x in lrs if x is not None and float(x) != 0.0]  # lr 0 switches a part off
    if not lrs:
        return
    distinct = sorted(set(lrs))
    if len(distinct) > 1:
        shown = ", ".join(f"{x:g}" for x in distinct)
        if display.lower() in _ONE_LR_ONLY:
            raise ConfigError(
                f"text_encoder_lr: optimizer_type {display} needs one learning rate for all parts, but unet_lr / text_encoder_lr / "
                f"learning_rate give {shown}; set them equal (about 1.0) or leave unet_lr and text_encoder_lr unset",
                "text_encoder_lr",
            )
        found.warn(f"optimizer_type {display} uses the first parameter group's learning rate for all groups; the others ({shown}) are ignored")
    if min(lrs) <= 0.1:
        found.warn(f"optimizer_type {display} finds its own step size; set learning_rate (and unet_lr / text_encoder_lr) around 1.0, not {min(lrs):g}")


def _config_lrs(config: TrainConfig) -> list[float]:
    lr = config.learning_rate
    lrs = []
    if not config.network_train_text_encoder_only:
        lrs.append(config.unet_lr if config.unet_lr is not None else lr)
    if not config.network_train_unet_only:
        te_lr = config.text_encoder_lr
        if isinstance(te_lr, (list, tuple)):  # one per text encoder
            lrs.extend(te_lr or [lr])
        else:
            lrs.append(te_lr if te_lr is not None else lr)
    return lrs


def _add_decouple(kwargs: dict, display: str, cls) -> None:
    if display.lower().startswith("dadapt") and "decouple" not in kwargs:
        accepted = _accepted_kwargs(cls)
        if accepted is not None and "decouple" in accepted:
            kwargs["decouple"] = True


# heavy modules: preflight only checks that their package exists
_HEAVY = ("bitsandbytes", "transformers", "schedulefree")


def check_optimizer_settings(config: TrainConfig, problems: Problems | None = None) -> list[str]:
    """Preflight for optimizer and scheduler settings: returns warnings (also recorded in ``problems``); raises
    ConfigError / UserErrors.

    Does not import bitsandbytes or transformers (their presence is looked up only); imports torch and
    light optimizer packages (dadaptation, prodigyopt, lion_pytorch) to check ``optimizer_args`` names.
    """
    from sd_scripts.training.schedulers import check_scheduler_settings

    found = Problems()
    opt_type = _legacy_type(config, found, collect_conflicts=True)
    kwargs: dict = {}
    try:
        kwargs = parse_kv_args(config.optimizer_args, "optimizer_args")
    except ConfigError as e:
        found.add(e)
    resolved = None
    try:
        resolved = resolve_optimizer_type(opt_type)
    except ConfigError as e:
        found.add(e)
    relative_step = False
    if resolved is not None:
        try:
            if not _package_present(resolved.module):
                if resolved.spec is None and resolved.module != "torch.optim":
                    raise ConfigError(f"optimizer_type {resolved.display}: cannot find module {resolved.module}; install its package or fix the name", "optimizer_type")
                raise _missing_package_error(resolved)
            if resolved.module.split(".")[0] not in _HEAVY:
                cls = _import_class(resolved)
                _check_arg_names(kwargs, resolved.display, cls)
            else:
                for key in ("params", "lr"):
                    if key in kwargs:
                        raise ConfigError(f"optimizer_args: {key}= is not allowed there; set learning_rate (and unet_lr / text_encoder_lr) instead", "optimizer_args")
        except ConfigError as e:
            found.add(e)
        if resolved.display == "AdaFactor":
            relative_step = _adafactor_rules(kwargs, config, found)
        if is_lr_free(resolved.display):
            try:
                _lr_free_rules(resolved.display, _config_lrs(config), found)
            except ConfigError as e:
                found.add(e)
    with found.collecting():
        found.extend(warnings=check_scheduler_settings(config, resolved.display if resolved else None,
                                                       adafactor_relative_step=relative_step))
    if problems is not None:
        problems.extend(warnings=found.warnings)
    found.raise_errors(one_as_is=True)
    return found.warnings


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OptimizerBuild:
    """What :func:`build_optimizer` made: the optimizer, kohya's ``ss_optimizer`` string, the warnings found and the
    optimizer type as resolved (its display name). Unpacks as ``optimizer, ss_optimizer = build_optimizer(...)``."""

    optimizer: Any
    ss_optimizer: str
    warnings: list[str] = dataclasses.field(default_factory=list)
    optimizer_type: str = ""

    def __iter__(self):
        return iter((self.optimizer, self.ss_optimizer))


def _normalize_groups(param_groups) -> list[dict]:
    groups = list(param_groups)
    if not groups:
        raise ValueError("build_optimizer: no parameters to optimize")
    if not isinstance(groups[0], dict):
        return [{"params": groups}]
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = list(g["params"])
        if "lr" in g and g["lr"] is None:
            del g["lr"]
        out.append(g)
    return out


def build_optimizer(config: TrainConfig, param_groups, warnings: list[str] | None = None) -> OptimizerBuild:
    """Create the optimizer named by ``config.optimizer_type`` over ``param_groups``.

    ``param_groups``: a list of dicts (``params`` and optionally ``lr``, as ``prepare_optimizer_params`` gives;
    they are copied, never modified) or an iterable of tensors. Returns :class:`OptimizerBuild`
    (``optimizer``, ``ss_optimizer``, ...); ``ss_optimizer`` is ``module.Class`` plus ``(k=v,...)`` of the
    optimizer_args actually passed (with defaults we added), as kohya writes it.
    """
    found = Problems()
    opt_type = _legacy_type(config, found, collect_conflicts=False)
    kwargs = parse_kv_args(config.optimizer_args, "optimizer_args")
    resolved = resolve_optimizer_type(opt_type)
    cls = _import_class(resolved)
    _check_arg_names(kwargs, resolved.display, cls)
    groups = _normalize_groups(param_groups)
    lr = config.learning_rate

    fixed: dict = {}
    if resolved.spec is not None:
        for k, v in resolved.spec.defaults:
            kwargs.setdefault(k, v)
        fixed = {k: v for k, v in resolved.spec.fixed if k not in kwargs}
    _add_decouple(kwargs, resolved.display, cls)

    if resolved.display == "AdaFactor":
        if _adafactor_rules(kwargs, config, found):
            # kohya: lr becomes the schedule's initial lr; per-group lrs are dropped
            lr = None
            for g in groups:
                g.pop("lr", None)
    if is_lr_free(resolved.display):
        _lr_free_rules(resolved.display, [g.get("lr", lr) for g in groups], found)

    call_kwargs = dict(kwargs, **fixed)
    # torch's fused or multi-tensor step where it has one for the device (same update, fewer kernel launches)
    call_kwargs.update(optimizer_speed_kwargs(cls, _params_device_type(groups), kwargs))
    if lr is not None or resolved.display == "AdaFactor":
        call_kwargs["lr"] = lr
    try:
        # some optimizer packages print() notes while constructing (dadaptation); route them to the log
        with contextlib.redirect_stdout(io.StringIO()) as out:
            optimizer = cls(groups, **call_kwargs)
        for line in out.getvalue().splitlines():
            if line.strip():
                logger.info("%s: %s", resolved.display, line.strip())
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"optimizer_args: {resolved.display} rejected the settings ({msg}); fix optimizer_args or learning_rate", "optimizer_args") from None
    if is_schedule_free(optimizer):
        optimizer.train()

    real = type(optimizer)
    name = f"{real.__module__}.{real.__name__}"
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    ss_optimizer = name + (f"({args})" if args else "")
    emit_warnings(found.warnings, warnings)
    return OptimizerBuild(optimizer, ss_optimizer, warnings=found.warnings, optimizer_type=resolved.display)


def _params_device_type(groups: list[dict]) -> str:
    for group in groups:
        for p in group.get("params", []):
            return getattr(getattr(p, "device", None), "type", "cpu")
    return "cpu"


def build_lr_scheduler(config: TrainConfig, optimizer, num_training_steps: int, num_processes: int = 1, warnings: list[str] | None = None):
    """See :func:`sd_scripts.training.schedulers.build_lr_scheduler`."""
    from sd_scripts.training.schedulers import build_lr_scheduler as _build

    return _build(config, optimizer, num_training_steps, num_processes=num_processes, warnings=warnings)
