"""Optimizers and lr schedulers: every name builds and steps, curves match the formulas, bad settings raise."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserErrors
from sd_scripts.training.optimizers import _ONE_LR_ONLY as ONE_LR_ONLY
from sd_scripts.training.optimizers import (
    build_lr_scheduler,
    build_optimizer,
    check_optimizer_settings,
    optimizer_names,
    parse_kv_args,
)
from sd_scripts.training.schedulers import (
    METRIC_SCHEDULERS,
    TRANSFORMERS_SCHEDULERS,
    resolve_warmup_steps,
    scheduler_names,
)


def has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


# ---------------------------------------------------------------------------------------------
# parse_kv_args
# ---------------------------------------------------------------------------------------------


def test_parse_kv_list_literals():
    args = parse_kv_args(["betas=0.9,0.99", "weight_decay=0.1", "decouple=True", "eps=1e-8", "name='x'"], "optimizer_args")
    assert args == {"betas": (0.9, 0.99), "weight_decay": 0.1, "decouple": True, "eps": 1e-8, "name": "x"}


def test_parse_kv_single_string_and_multi_pair_items():
    assert parse_kv_args("a=1 b=(1, 2) c=\"x y\" d=false", "s") == {"a": 1, "b": (1, 2), "c": "x y", "d": False}
    assert parse_kv_args(["weight_decay=0.1 betas=0.9,0.99"], "s") == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert parse_kv_args(None, "s") == {} and parse_kv_args([], "s") == {} and parse_kv_args("", "s") == {}


def test_parse_kv_dict_form():
    got = parse_kv_args({"weight_decay": "0.1", "betas": [0.9, 0.99], "decouple": True, "d0": 1e-6}, "optimizer_args")
    assert got == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "d0": 1e-6}


def test_parse_kv_step_rules_kept_as_text():
    assert parse_kv_args(["step_rules=1:10,0.1:20,0.01"], "lr_scheduler_args") == {"step_rules": "1:10,0.1:20,0.01"}


@pytest.mark.parametrize(
    "items, words",
    [
        (["weight_decay=abc"], ["optimizer_args", "weight_decay", '"abc"']),
        (["weight_decay"], ["optimizer_args", "key=value"]),
        (["=3"], ["optimizer_args"]),
        (["weight_decay="], ["optimizer_args", "no value"]),
        (["a=1", "a=2"], ["optimizer_args", "twice"]),
        (["my-key=1"], ["optimizer_args", "my-key"]),
        (["x=__import__('os')"], ["optimizer_args", "x"]),
    ],
)
def test_parse_kv_errors(items, words):
    with pytest.raises(ConfigError) as e:
        parse_kv_args(items, "optimizer_args")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


# ---------------------------------------------------------------------------------------------
# every optimizer builds and steps
# ---------------------------------------------------------------------------------------------

PACKAGE = {
    "AdamW": "torch", "SGDNesterov": "torch", "Lion": "lion_pytorch", "Prodigy": "prodigyopt", "AdaFactor": "transformers",
}


def _package_of(name: str) -> str:
    if name in PACKAGE:
        return PACKAGE[name]
    if name.lower().startswith("dadapt"):
        return "dadaptation"
    if name.lower().endswith("schedulefree"):
        return "schedulefree"
    return "bitsandbytes"


def two_groups(lrs=(1e-2, 5e-3)):
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64, 64) * 0.1)  # >= 4096 elements: bitsandbytes keeps 8-bit state
    small = torch.nn.Parameter(torch.randn(4, 8) * 0.1)
    return [big, small], [{"params": [big], "lr": lrs[0]}, {"params": [small], "lr": lrs[1]}]


def take_steps(optimizer, params, n=2):
    before = [p.detach().clone() for p in params]
    for _ in range(n):
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
    return [not torch.equal(p, b) for p, b in zip(params, before)]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", optimizer_names())
def test_every_optimizer_builds_and_steps(name):
    if not has(_package_of(name)):
        pytest.skip(f"{_package_of(name)} not installed")
    lrs = (1e-2, 5e-3)
    params, groups = two_groups(lrs)
    if name.lower() in ONE_LR_ONLY:
        # these fail in step() when groups have different lrs: caught at build time instead
        with pytest.raises(ConfigError, match="one learning rate"):
            build_optimizer(cfg(optimizer_type=name, learning_rate=1e-2), groups)
        lrs = (1.0, 1.0)
        params, groups = two_groups(lrs)
    opt, ss = build_optimizer(cfg(optimizer_type=name, learning_rate=lrs[0]), groups, warnings=[])
    changed = take_steps(opt, params)
    assert any(changed), name
    assert ss.split("(")[0].endswith(type(opt).__name__)
    if name == "AdaFactor":  # relative_step: group lrs are dropped (kohya)
        assert all(g["lr"] is None for g in opt.param_groups)
    else:
        assert [g["lr"] for g in opt.param_groups] == list(lrs)
    # the caller's groups are not modified
    assert (groups[0]["lr"], groups[1]["lr"]) == lrs
    if "8bit" in name:
        assert opt.state[params[0]]["state1"].dtype == torch.uint8


def test_case_insensitive_and_same_class():
    params, groups = two_groups()
    a, _ = build_optimizer(cfg(optimizer_type="adamw"), groups)
    b, _ = build_optimizer(cfg(optimizer_type="ADAMW"), groups)
    assert type(a) is type(b) is torch.optim.AdamW


@pytest.mark.parametrize("name, cls", [("Adam", "Adam"), ("radam", "RAdam"), ("NAdam", "NAdam"), ("torch.optim.SGD", "SGD")])
def test_torch_optim_names(name, cls):
    params, groups = two_groups()
    opt, ss = build_optimizer(cfg(optimizer_type=name), groups)
    assert type(opt).__name__ == cls and ss.startswith("torch.optim.")
    assert all(take_steps(opt, params))


@pytest.mark.skipif(not has("bitsandbytes"), reason="bitsandbytes not installed")
def test_package_class_name():
    params, groups = two_groups()
    opt, ss = build_optimizer(cfg(optimizer_type="bitsandbytes.optim.AdEMAMix8bit"), groups)
    assert ss.startswith("bitsandbytes.optim.") and ss.split("(")[0].endswith(".AdEMAMix8bit")
    assert any(take_steps(opt, params))


def test_ss_optimizer_string_like_kohya():
    _, groups = two_groups()
    _, ss = build_optimizer(cfg(optimizer_args=["weight_decay=0.1", "betas=0.9,0.99"]), groups)
    assert ss == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    _, ss = build_optimizer(cfg(), groups)
    assert ss == "torch.optim.adamw.AdamW"


def test_sgd_nesterov_momentum_default():
    _, groups = two_groups()
    opt, ss = build_optimizer(cfg(optimizer_type="SGDNesterov"), groups)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    assert ss == "torch.optim.sgd.SGD(momentum=0.9)"
    opt, _ = build_optimizer(cfg(optimizer_type="SGDNesterov", optimizer_args=["momentum=0.5"]), groups)
    assert opt.defaults["momentum"] == 0.5


@pytest.mark.skipif(not has("dadaptation"), reason="dadaptation not installed")
def test_dadaptation_decouple_and_kohya_head_class():
    _, groups = two_groups((1.0, 1.0))
    warns: list[str] = []
    opt, ss = build_optimizer(cfg(optimizer_type="DAdaptation", learning_rate=1.0), groups, warnings=warns)
    assert type(opt).__name__ == "DAdaptAdamPreprint"
    assert opt.defaults["decouple"] is True and "decouple=True" in ss
    assert warns == []
    opt, _ = build_optimizer(cfg(optimizer_type="DAdaptAdam", learning_rate=1.0), groups)
    assert opt.defaults["decouple"] is True
    opt, _ = build_optimizer(cfg(optimizer_type="DAdaptAdam", learning_rate=1.0, optimizer_args=["decouple=False"]), groups)
    assert opt.defaults["decouple"] is False
    opt, ss = build_optimizer(cfg(optimizer_type="DAdaptLion", learning_rate=1.0), groups)  # no decouple argument
    assert "decouple" not in opt.defaults and "(" not in ss


@pytest.mark.skipif(not (has("dadaptation") and has("prodigyopt")), reason="dadaptation/prodigyopt not installed")
@pytest.mark.parametrize("name", ["DAdaptAdam", "DAdaptation", "DAdaptLion", "DAdaptSGD", "Prodigy"])
def test_lr_free_one_lr_only(name):
    _, groups = two_groups((1.0, 0.5))
    with pytest.raises(ConfigError) as e:
        build_optimizer(cfg(optimizer_type=name, learning_rate=1.0), groups)
    assert e.value.setting == "text_encoder_lr" and "give 0.5, 1;" in str(e.value)
    with pytest.raises(ConfigError, match="one learning rate"):
        check_optimizer_settings(cfg(optimizer_type=name, learning_rate=1.0, text_encoder_lr=0.5))
    # a part switched off with lr 0 does not count
    assert check_optimizer_settings(cfg(optimizer_type=name, learning_rate=1.0, text_encoder_lr=0.0)) == []
    warns = check_optimizer_settings(cfg(optimizer_type=name, learning_rate=1e-4))
    assert any("around 1.0" in w for w in warns)
    result = build_optimizer(cfg(optimizer_type=name, learning_rate=1e-4), two_groups((1e-4, 1e-4))[1], warnings=[])
    assert any("around 1.0" in w for w in result.warnings)
    assert check_optimizer_settings(cfg(optimizer_type=name, learning_rate=1.0)) == []


@pytest.mark.skipif(not has("dadaptation"), reason="dadaptation not installed")
@pytest.mark.parametrize("name", ["DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP"])
def test_lr_free_first_group_lr_warning(name):
    params, groups = two_groups((1.0, 0.5))
    result = build_optimizer(cfg(optimizer_type=name, learning_rate=1.0), groups, warnings=[])
    assert any("first parameter group" in w for w in result.warnings)
    take_steps(result.optimizer, params)
    warns = check_optimizer_settings(cfg(optimizer_type=name, learning_rate=1.0, unet_lr=0.5))
    assert any("first parameter group" in w for w in warns)


def test_legacy_flags():
    _, groups = two_groups()
    if has("bitsandbytes"):
        warns: list[str] = []
        opt, _ = build_optimizer(cfg(use_8bit_adam=True), groups, warnings=warns)
        assert type(opt).__name__ == "AdamW8bit" and any("deprecated" in w for w in warns)
    if has("lion_pytorch"):
        opt, _ = build_optimizer(cfg(use_lion_optimizer=True), groups, warnings=[])
        assert type(opt).__name__ == "Lion"
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        build_optimizer(cfg(use_8bit_adam=True, use_lion_optimizer=True), groups)
    with pytest.raises(ConfigError, match="use_8bit_adam conflicts with optimizer_type Lion"):
        build_optimizer(cfg(use_8bit_adam=True, optimizer_type="Lion"), groups)


# ---------------------------------------------------------------------------------------------
# AdaFactor (kohya's relative_step rules)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not has("transformers"), reason="transformers not installed")
def test_adafactor_relative_step_default_uses_own_schedule():
    params, groups = two_groups()
    config = cfg(optimizer_type="AdaFactor", learning_rate=1e-3, unet_lr=1e-3, lr_scheduler="cosine")
    warns: list[str] = []
    opt, ss = build_optimizer(config, groups, warnings=warns)
    assert ss == "transformers.optimization.Adafactor(relative_step=True)"
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert any("unet_lr and text_encoder_lr are ignored" in w for w in warns)
    assert any("lr_scheduler cosine is replaced" in w for w in warns)
    sched = build_lr_scheduler(config, opt, 10, warnings=[])
    from transformers.optimization import AdafactorSchedule

    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == [1e-3, 1e-3]
    take_steps(opt, params)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        build_lr_scheduler(config.replace(lr_warmup_steps=5), opt, 10)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        check_optimizer_settings(config.replace(lr_warmup_steps=5))


@pytest.mark.skipif(not has("transformers"), reason="transformers not installed")
def test_adafactor_schedule_when_a_group_sits_a_step_out():
    """DyLoRA trains one rank slice per step: a group whose first parameter got no gradient still has an lr."""
    params, groups = two_groups()
    config = cfg(optimizer_type="AdaFactor", learning_rate=1e-3)
    opt, _ = build_optimizer(config, groups, warnings=[])
    sched = build_lr_scheduler(config, opt, 10, warnings=[])
    take_steps(opt, params, n=1)
    params[1].sum().backward()  # only the second group has a gradient
    opt.step()
    sched.step()
    lrs = sched.get_last_lr()
    assert len(lrs) == 2 and all(lr > 0 for lr in lrs)


@pytest.mark.skipif(not has("transformers"), reason="transformers not installed")
def test_adafactor_manual_lr_and_warmup_init():
    params, groups = two_groups()
    config = cfg(optimizer_type="AdaFactor", optimizer_args=["relative_step=False", "scale_parameter=False"], lr_scheduler="cosine")
    warns: list[str] = []
    opt, _ = build_optimizer(config, groups, warnings=warns)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-3]
    assert any("max_grad_norm 0" in w for w in warns) and any("constant_with_warmup" in w for w in warns)
    sched = build_lr_scheduler(config, opt, 10, warnings=[])
    assert type(sched).__name__ == "LambdaLR"
    take_steps(opt, params)
    opt, ss = build_optimizer(cfg(optimizer_type="AdaFactor", optimizer_args=["relative_step=False", "warmup_init=True"]), groups, warnings=[])
    assert opt.defaults["relative_step"] is True and "relative_step=True" in ss


# ---------------------------------------------------------------------------------------------
# bad optimizer settings
# ---------------------------------------------------------------------------------------------


def test_unknown_optimizer_lists_names():
    _, groups = two_groups()
    for call in (lambda c: build_optimizer(c, groups), check_optimizer_settings):
        with pytest.raises(ConfigError) as e:
            call(cfg(optimizer_type="AdamWW"))
        msg = str(e.value)
        assert msg.startswith("optimizer_type") and "AdamW8bit" in msg and "Prodigy" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "opt_type, args, words",
    [
        ("AdamW", ["weight_decay=abc"], ["optimizer_args", "weight_decay"]),
        ("AdamW", ["foo=1"], ["optimizer_args", "foo", "weight_decay"]),
        ("AdamW", ["lr=0.1"], ["optimizer_args", "learning_rate"]),
        ("AdamW", ["betas=5"], ["optimizer_args"]),  # rejected by the constructor
        ("SGDNesterov", ["momentum=0"], ["optimizer_args"]),  # nesterov needs momentum
    ],
)
def test_bad_optimizer_args(opt_type, args, words):
    _, groups = two_groups()
    with pytest.raises(ConfigError) as e:
        build_optimizer(cfg(optimizer_type=opt_type, optimizer_args=args), groups)
    for w in words:
        assert w in str(e.value)


def test_bad_package_class():
    with pytest.raises(ConfigError, match="optimizer_type no_such_pkg.Opt"):
        check_optimizer_settings(cfg(optimizer_type="no_such_pkg.Opt"))
    _, groups = two_groups()
    with pytest.raises(ConfigError, match="has no class"):
        build_optimizer(cfg(optimizer_type="torch.optim.NoSuch"), groups)
    with pytest.raises(ConfigError, match="closure"):
        check_optimizer_settings(cfg(optimizer_type="LBFGS"))


def test_missing_bitsandbytes_one_clear_line(monkeypatch):
    import sd_scripts.training.optimizers as O

    real = importlib.util.find_spec
    monkeypatch.setattr(O.importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] == "bitsandbytes" else real(n, *a))
    with pytest.raises(ConfigError) as e:
        check_optimizer_settings(cfg(optimizer_type="PagedAdamW8bit"))
    msg = str(e.value)
    assert msg.startswith("optimizer_type PagedAdamW8bit") and "bitsandbytes" in msg and "optimizer_type AdamW" in msg


def test_missing_package_at_build(monkeypatch):
    import sd_scripts.training.optimizers as O

    monkeypatch.setitem(O._SPECS, "fakeopt", O._Spec("FakeOpt", "no_such_module_xyz", "Fake", "no-such-package"))
    _, groups = two_groups()
    with pytest.raises(ConfigError, match="pip install no-such-package"):
        build_optimizer(cfg(optimizer_type="fakeopt"), groups)


def test_check_collects_several_errors():
    with pytest.raises(UserErrors) as e:
        check_optimizer_settings(cfg(optimizer_type="nope", lr_scheduler="nope", optimizer_args=["x=y"]))
    settings = {err.setting for err in e.value.errors}
    assert {"optimizer_type", "lr_scheduler", "optimizer_args"} <= settings


def test_check_defaults_clean_and_light():
    assert check_optimizer_settings(cfg()) == []
    code = (
        "import sys; from sd_scripts.core.config import TrainConfig as T;"
        "from sd_scripts.training.optimizers import check_optimizer_settings as c;"
        "c(T(optimizer_type='AdamW8bit', lr_scheduler='cosine', lr_warmup_steps='5%'));"
        "c(T(optimizer_type='AdaFactor', lr_scheduler='constant'));"
        "print(sorted(m for m in ('bitsandbytes','transformers','diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------
# schedulers: curves
# ---------------------------------------------------------------------------------------------

BASE = (1.0, 0.5)


def curve(config, total, num_processes=1, steps=None):
    """Factor (lr / base lr) of both groups after s scheduler steps, for s in 0..total*num_processes."""
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "lr": BASE[0]}, {"params": [p2], "lr": BASE[1]}], lr=BASE[0])
    sched = build_lr_scheduler(config, opt, total, num_processes=num_processes, warnings=[])
    out = []
    n = total * num_processes
    for s in range(n + 1):
        lrs = sched.get_last_lr()
        f1, f2 = lrs[0] / BASE[0], lrs[1] / BASE[1]
        assert math.isclose(f1, f2, rel_tol=1e-9, abs_tol=1e-12), (s, lrs)
        out.append(f1)
        opt.step()
        sched.step()
    return out


def lin_warm(s, w):
    return s / max(1, w)


T, W = 20, 4


def _progress(s):
    return (s - W) / (T - W)


FORMULAS = {
    "linear": lambda s: lin_warm(s, W) if s < W else max(0.0, (T - s) / (T - W)),
    "cosine": lambda s: lin_warm(s, W) if s < W else max(0.0, 0.5 * (1 + math.cos(math.pi * _progress(s)))),
    "cosine_with_restarts": lambda s: lin_warm(s, W) if s < W else (
        0.0 if _progress(s) >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * _progress(s)) % 1.0)))
    ),
    "polynomial": lambda s: lin_warm(s, W) if s < W else ((1.0 - 1e-7) * (1 - _progress(s)) ** 2.0 + 1e-7),
    "constant_with_warmup": lambda s: lin_warm(s, W) if s < W else 1.0,
    "inverse_sqrt": lambda s: lin_warm(s, W) if s < W else 1 / math.sqrt(s / W),
    "cosine_with_min_lr": lambda s: lin_warm(s, W) if s < W else (
        0.5 * (1 + math.cos(math.pi * 3 * _progress(s))) * (1 - 0.1) + 0.1  # kohya: num_cycles / 2 cosine periods
    ),
    "cosine_warmup_with_min_lr": lambda s: (s + 1) / W if s < W else max(
        0.0, 0.5 * (1 + math.cos(math.pi * 3 * (s - W + 1) / (T - W))) * 0.9 + 0.1
    ),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_scheduler_curves_match_formulas(name):
    config = cfg(lr_scheduler=name, lr_warmup_steps=W, lr_scheduler_num_cycles=3, lr_scheduler_power=2.0,
                 lr_scheduler_args=["min_lr_rate=0.1"] if "min_lr" in name else [])
    got = curve(config, T)
    for s in (0, 1, W - 1, W, W + 1, 9, 13, T - 1, T):
        want = FORMULAS[name](s)
        if name == "cosine_warmup_with_min_lr" and s >= T:
            continue  # past the end its progress formula runs on; not a training step
        assert math.isclose(got[s], want, rel_tol=1e-6, abs_tol=1e-9), (name, s, got[s], want)


def test_constant_and_warmup_stable_decay():
    assert curve(cfg(lr_scheduler="constant"), 10) == [1.0] * 11
    config = cfg(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2)
    config.lr_decay_steps = 4  # kohya setting that TrainConfig may lack; read with getattr
    got = curve(config, 10)
    assert got[0] == 0 and got[1] == 0.5 and got[2:6] == [1.0] * 4
    for s in range(6, 10):
        assert math.isclose(got[s], 0.5 * (1 + math.cos(math.pi * (s - 6) / 4)), abs_tol=1e-9)


def test_piecewise_constant_and_custom_type():
    got = curve(cfg(lr_scheduler="piecewise_constant", lr_scheduler_args=['step_rules="1:3,0.5:6,0.1"']), 8)
    assert got == [1.0] * 3 + [0.5] * 3 + [0.1] * 3
    got = curve(cfg(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"]), 6)
    assert got == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
    got = curve(cfg(lr_scheduler_type="torch.optim.lr_scheduler.LinearLR", lr_scheduler_args=["start_factor=0.5", "total_iters=2"]), 3)
    assert got == [0.5, 0.75, 1.0, 1.0]


def test_scheduler_names_cover_installed_transformers():
    from transformers import SchedulerType

    installed = {s.value for s in SchedulerType}
    assert installed == set(TRANSFORMERS_SCHEDULERS) | set(METRIC_SCHEDULERS)
    assert "piecewise_constant" in scheduler_names() and "adafactor" in scheduler_names()


@pytest.mark.parametrize("name", [n for n in scheduler_names() if n != "adafactor"])
def test_every_scheduler_name_builds(name):
    args = {"piecewise_constant": ['step_rules="1:5,0.1"'], "cosine_with_min_lr": ["min_lr_rate=0.1"],
            "cosine_warmup_with_min_lr": ["min_lr_rate=0.1"]}.get(name, [])
    warmup = 0 if name in ("constant", "piecewise_constant") else 2
    got = curve(cfg(lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_args=args), 10)
    assert len(got) == 11 and all(0 <= f <= 1.0 + 1e-9 for f in got)


# ---------------------------------------------------------------------------------------------
# warm-up forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [10, 10.0, "10", 0.1, "0.1", "10%", " 10 % ".replace(" ", "")])
def test_warmup_forms(value):
    assert resolve_warmup_steps(value, 100) == 10
    assert resolve_warmup_steps(value, 100, num_processes=2) == 20  # scheduler steps, both forms scaled


def test_warmup_forms_in_a_curve():
    a = curve(cfg(lr_scheduler="linear", lr_warmup_steps="25%"), 8)
    b = curve(cfg(lr_scheduler="linear", lr_warmup_steps=2), 8)
    c = curve(cfg(lr_scheduler="linear", lr_warmup_steps=0.25), 8)
    assert a == b == c and a[:3] == [0.0, 0.5, 1.0]
    # two processes: the schedule spans 2x scheduler steps, warm-up included
    d = curve(cfg(lr_scheduler="linear", lr_warmup_steps=2), 8, num_processes=2)
    assert d[::2] == a


@pytest.mark.parametrize("value", ["abc", -1, 2.5, "150%", "x%", True, float("nan")])
def test_bad_warmup(value):
    with pytest.raises(ConfigError) as e:
        check_optimizer_settings(cfg(lr_scheduler="cosine", lr_warmup_steps=value))
    assert str(e.value).startswith("lr_warmup_steps")


# ---------------------------------------------------------------------------------------------
# bad scheduler settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, setting, words",
    [
        (dict(lr_scheduler="constant", lr_warmup_steps=10), "lr_warmup_steps", ["constant_with_warmup"]),
        (dict(lr_scheduler="cosine_annealing"), "lr_scheduler", ["unknown", "cosine_with_restarts", "piecewise_constant"]),
        (dict(lr_scheduler="reduce_lr_on_plateau"), "lr_scheduler", ["validation"]),
        (dict(lr_scheduler="adafactor"), "lr_scheduler", ["AdaFactor"]),
        (dict(lr_scheduler="piecewise_constant"), "lr_scheduler_args", ["step_rules"]),
        (dict(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules='a:b'"]), "lr_scheduler_args", ["step_rules"]),
        (dict(lr_scheduler="cosine_with_min_lr"), "lr_scheduler_args", ["min_lr_rate"]),
        (dict(lr_scheduler="cosine", lr_scheduler_args=["num_warmup_steps=3"]), "lr_scheduler_args", ["lr_warmup_steps"]),
        (dict(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"], lr_warmup_steps=3), "lr_warmup_steps", ["StepLR"]),
        (dict(lr_scheduler_type="NoSuchLR"), "lr_scheduler_type", ["StepLR"]),
        (dict(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "bogus=1"]), "lr_scheduler_args", ["bogus", "gamma"]),
        (dict(lr_scheduler="cosine", lr_scheduler_args=["x=notaliteral"]), "lr_scheduler_args", ["x"]),
    ],
)
def test_bad_scheduler_settings(kw, setting, words):
    config = cfg(**kw)
    with pytest.raises(ConfigError) as e:
        check_optimizer_settings(config)
    assert str(e.value).startswith(setting) and e.value.setting == setting
    for w in words:
        assert w in str(e.value)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ConfigError) as e2:
        build_lr_scheduler(config, opt, 10)
    assert e2.value.setting == setting


def test_bad_scheduler_args_at_build():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_scheduler_args: cosine has no argument bogus"):
        build_lr_scheduler(cfg(lr_scheduler="cosine", lr_scheduler_args=["bogus=1"]), opt, 10)


def test_scheduler_warnings():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    warns: list[str] = []
    build_lr_scheduler(cfg(lr_scheduler="cosine", lr_warmup_steps=50), opt, 10, warnings=warns)
    assert any("longer than the training" in w for w in warns)
    warns = check_optimizer_settings(cfg(lr_scheduler="piecewise_constant", lr_warmup_steps=3, lr_scheduler_args=['step_rules="1:5,0.1"']))
    assert any("ignored" in w for w in warns)


# ---------------------------------------------------------------------------------------------
# schedule-free optimizers (package faked when absent)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_schedulefree(monkeypatch):
    import importlib.machinery
    import types

    if has("schedulefree"):
        return
    module = types.ModuleType("schedulefree")
    module.__spec__ = importlib.machinery.ModuleSpec("schedulefree", None)

    class AdamWScheduleFree(torch.optim.AdamW):
        def __init__(self, params, lr=0.0025, warmup_steps=0, **kw):
            super().__init__(params, lr=lr, **kw)
            self.mode = None

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

    AdamWScheduleFree.__module__ = "schedulefree.adamw_schedulefree"
    module.AdamWScheduleFree = AdamWScheduleFree
    monkeypatch.setitem(sys.modules, "schedulefree", module)


def test_schedule_free_gets_constant_schedule(fake_schedulefree):
    from sd_scripts.training.optimizers import is_schedule_free

    params, groups = two_groups()
    config = cfg(optimizer_type="AdamWScheduleFree", optimizer_args=["warmup_steps=5"], lr_scheduler="cosine", lr_warmup_steps=3)
    warns = check_optimizer_settings(config)
    assert any("needs no schedule" in w for w in warns)
    opt, ss = build_optimizer(config, groups)
    assert is_schedule_free(opt) and ss.startswith("schedulefree.") and "warmup_steps=5" in ss
    if hasattr(opt, "mode"):
        assert opt.mode == "train"  # put in train mode, as kohya does
    warns = []
    sched = build_lr_scheduler(config, opt, 10, warnings=warns)
    assert any("needs no schedule" in w for w in warns)
    for _ in range(3):
        take_steps(opt, params, 1)
        sched.step()
    assert sched.get_last_lr() == [1e-2, 5e-3]
