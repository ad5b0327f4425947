"""kohya's noise and loss options: each formula against a hand computation, the setting checks, and short
tiny-model trainings with several options on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_scripts.training import losses as loss_terms
from sd_scripts.core.config import TrainConfig
from sd_scripts.training.noise import (
    make_noise_scheduler, min_snr_weights, per_sample_mse, perturb_noise, sample_noise, sample_timesteps,
)
from tests.helpers import make_dataset, tiny_config

# --------------------------------------------------------------------------------------- zero terminal SNR


def _sd_alphas_cumprod() -> list[float]:
    """SD's schedule by hand: scaled_linear betas 0.00085 -> 0.012 over 1000 steps, in float64."""
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(start + (end - start) * i / 999) ** 2 for i in range(1000)]
    out, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        out.append(product)
    return out


def test_zero_terminal_snr_schedule():
    plain = make_noise_scheduler(False)
    zero = make_noise_scheduler(True, zero_terminal_snr=True)
    a = zero.alphas_cumprod
    assert a[-1].item() == 0.0 and zero.betas[-1].item() == 1.0
    assert abs(a[0].item() - plain.alphas_cumprod[0].item()) < 1e-6  # the first is unchanged
    assert torch.equal(zero.alphas, 1 - zero.betas) and torch.all(a[1:] < a[:-1])
    # sqrt(alphas_cumprod) is the original one shifted and scaled linearly (Lin et al. 2023, algorithm 1)
    hand = [math.sqrt(x) for x in _sd_alphas_cumprod()]
    first, last = hand[0], hand[-1]
    for t in (0, 1, 250, 500, 998, 999):
        expected = (hand[t] - last) * first / (first - last)
        assert math.isclose(a[t].sqrt().item(), expected, abs_tol=2e-5), t
    assert torch.equal(make_noise_scheduler(False).alphas_cumprod, plain.alphas_cumprod)  # off: untouched


def test_zero_terminal_snr_samplers_start_from_pure_noise():
    from sd_scripts.training.sampling import SAMPLERS, make_sampler, zero_terminal_snr_sampler

    for name in SAMPLERS:
        if name.startswith("k_") or name == "lms" and not _has("scipy"):
            continue
        scheduler = zero_terminal_snr_sampler(make_sampler(name, True))
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.alphas_cumprod[-1].item() == pytest.approx(2**-24), name
        assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-5), name
        scheduler.set_timesteps(10)
        assert int(scheduler.timesteps[0]) == 999, name


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


# --------------------------------------------------------------------------------------- noise and timesteps


def test_noise_offset_default_random_and_adaptive():
    latents = torch.randn(2, 4, 8, 8) + torch.tensor([0.0, 1.0, -2.0, 0.5]).view(1, 4, 1, 1)
    torch.manual_seed(0)
    base = torch.randn_like(latents)
    plain_offset = torch.randn(2, 4, 1, 1)
    torch.manual_seed(0)
    assert torch.equal(sample_noise(latents, 0.1), base + 0.1 * plain_offset)  # unchanged without the new options

    torch.manual_seed(1)
    base = torch.randn_like(latents)
    strength = torch.rand(1) * 0.1
    offset = torch.randn(2, 4, 1, 1)
    torch.manual_seed(1)
    assert torch.allclose(sample_noise(latents, 0.1, random_strength=True), base + strength * offset)

    mean = latents.mean(dim=(2, 3), keepdim=True).abs()
    torch.manual_seed(2)
    base = torch.randn_like(latents)
    offset = torch.randn(2, 4, 1, 1)
    torch.manual_seed(2)
    got = sample_noise(latents, 0.1, adaptive_noise_scale=0.05)
    assert torch.allclose(got, base + (0.1 + 0.05 * mean) * offset)
    torch.manual_seed(2)  # a negative scale clamps the offset at 0 where the mean is large
    got = sample_noise(latents, 0.1, adaptive_noise_scale=-1.0)
    expected = base + torch.clamp(0.1 - mean, min=0) * offset
    assert torch.allclose(got, expected) and torch.equal(got[:, 2], base[:, 2])


def test_timesteps_range_constant_and_default():
    torch.manual_seed(3)
    default = sample_timesteps(64, "cpu")
    torch.manual_seed(3)
    assert torch.equal(default, torch.randint(0, 1000, (64,)))
    torch.manual_seed(3)
    assert torch.equal(sample_timesteps(64, "cpu", min_timestep=None, max_timestep=None), default)
    drawn = sample_timesteps(4000, "cpu", min_timestep=200, max_timestep=300)
    assert drawn.min().item() == 200 and drawn.max().item() == 299 and drawn.dtype == torch.long
    assert torch.equal(sample_timesteps(3, "cpu", min_timestep=500, max_timestep=500), torch.tensor([500, 500, 500]))


def test_ip_noise_perturbs_only_the_input():
    noise = torch.randn(2, 4, 8, 8)
    state = torch.get_rng_state()
    assert perturb_noise(noise, None) is noise and perturb_noise(noise, 0.0) is noise
    assert torch.equal(torch.get_rng_state(), state), "off, it must draw nothing"
    torch.manual_seed(4)
    extra = torch.randn_like(noise)
    torch.manual_seed(4)
    assert torch.allclose(perturb_noise(noise, 0.1), noise + 0.1 * extra)
    torch.manual_seed(5)
    strength = torch.rand(1) * 0.1
    extra = torch.randn_like(noise)
    torch.manual_seed(5)
    assert torch.allclose(perturb_noise(noise, 0.1, random_strength=True), noise + strength * extra)


# --------------------------------------------------------------------------------------- loss types


def test_loss_types_by_hand():
    pred = torch.tensor([0.0, 0.05, 1.0, -3.0]).view(1, 4, 1, 1)
    target = torch.zeros(1, 4, 1, 1)
    c = torch.tensor([0.1])
    d = [0.0, 0.05, 1.0, -3.0]
    cases = {
        "l2": [x * x for x in d],
        "l1": [abs(x) for x in d],
        "huber": [2 * 0.1 * (math.sqrt(x * x + 0.01) - 0.1) for x in d],
        "smooth_l1": [2 * (math.sqrt(x * x + 0.01) - 0.1) for x in d],
    }
    for loss_type, expected in cases.items():
        got = loss_terms.elementwise_loss(pred, target, loss_type, c).flatten().tolist()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-8), loss_type
    # huber is quadratic well inside c and linear (slope 2c) far outside it
    small = loss_terms.elementwise_loss(torch.tensor([[1e-3]]), torch.zeros(1, 1), "huber", c).item()
    assert small == pytest.approx(1e-6, rel=1e-2)  # float32 cancellation in sqrt(d^2 + c^2) - c
    big = loss_terms.elementwise_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), "huber", c).item()
    assert big == pytest.approx(2 * 0.1 * (100 - 0.1), rel=1e-5)


def test_l2_is_bit_identical_to_per_sample_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(loss_terms.per_sample_loss(pred, target), per_sample_mse(pred, target))
    masks = torch.rand(3, 64, 64)
    assert torch.equal(loss_terms.per_sample_loss(pred, target, "l2", None, masks), per_sample_mse(pred, target, masks))


def test_huber_schedules_by_hand():
    alphas_cumprod = make_noise_scheduler(False).alphas_cumprod
    t = torch.tensor([0, 500, 999, 1000 - 1])
    constant = loss_terms.huber_threshold(t, alphas_cumprod, "constant", 0.1, 2.0)
    assert constant.tolist() == pytest.approx([0.2] * 4)
    exponential = loss_terms.huber_threshold(t, alphas_cumprod, "exponential", 0.1, 2.0)
    # exp(-t * (-ln c) / 1000) * scale = c^(t/1000) * scale
    assert exponential.tolist() == pytest.approx([2.0 * 0.1 ** (x / 1000) for x in (0, 500, 999, 999)], rel=1e-5)
    snr = loss_terms.huber_threshold(t, alphas_cumprod, "snr", 0.1, 2.0)  # the scale does not apply
    hand = _sd_alphas_cumprod()
    expected = [(1 - 0.1) / (1 + math.sqrt((1 - hand[x]) / hand[x])) ** 2 + 0.1 for x in (0, 500, 999, 999)]
    assert snr.tolist() == pytest.approx(expected, rel=1e-4)
    # on the zero-terminal-SNR schedule the last timestep's sigma is infinite: c alone
    zero = make_noise_scheduler(True, zero_terminal_snr=True).alphas_cumprod
    assert loss_terms.huber_threshold(torch.tensor([999]), zero, "snr", 0.1, 1.0).item() == pytest.approx(0.1)


# --------------------------------------------------------------------------------------- SNR weightings


def test_snr_weightings_by_hand():
    snr = torch.tensor([0.5, 5.0, 2000.0])
    capped = [0.5, 5.0, 1000.0]  # kohya caps the SNR at 1000 in these weightings
    assert loss_terms.snr_loss_weights(snr, False) is None
    only_min_snr = loss_terms.snr_loss_weights(snr, True, min_snr_gamma=5.0)
    assert torch.equal(only_min_snr, min_snr_weights(snr, 5.0, True))  # as before: the same tensor
    assert min_snr_weights(snr, 5.0, False).tolist() == pytest.approx([1.0, 1.0, 5 / 2000])
    assert min_snr_weights(snr, 5.0, True).tolist() == pytest.approx([0.5 / 1.5, 5 / 6, 5 / 2001])
    scaled = loss_terms.snr_loss_weights(snr, True, scale_v_pred_loss_like_noise_pred=True)
    assert scaled.tolist() == pytest.approx([s / (s + 1) for s in capped])
    like = loss_terms.snr_loss_weights(snr, False, v_pred_like_loss=0.2)
    assert like.tolist() == pytest.approx([1 + 0.2 * (s + 1) / s for s in capped])
    debiased_eps = loss_terms.snr_loss_weights(snr, False, debiased_estimation_loss=True)
    assert debiased_eps.tolist() == pytest.approx([1 / math.sqrt(s) for s in capped])
    debiased_v = loss_terms.snr_loss_weights(snr, True, debiased_estimation_loss=True)
    assert debiased_v.tolist() == pytest.approx([1 / (s + 1) for s in capped])
    both = loss_terms.snr_loss_weights(snr, False, min_snr_gamma=5.0, debiased_estimation_loss=True)
    assert both.tolist() == pytest.approx([m / math.sqrt(s) for m, s in zip([1.0, 1.0, 5 / 2000], capped)])


# --------------------------------------------------------------------------------------- setting checks


def _problems(v_parameterization: bool | None = None, **settings):
    config = TrainConfig(**settings)
    errors, warnings = loss_terms.check_noise_loss_settings(config)
    if v_parameterization is not None:
        more_errors, more_warnings = loss_terms.prediction_type_problems(config, v_parameterization)
        errors, warnings = errors + more_errors, warnings + more_warnings
    return [str(e) for e in errors], warnings


@pytest.mark.parametrize("settings, v, needle", [
    (dict(adaptive_noise_scale=0.01), None, "adaptive_noise_scale: needs noise_offset"),
    (dict(min_timestep=600, max_timestep=400), None, "min_timestep: 600 is above max_timestep 400"),
    (dict(max_timestep=1001), None, "max_timestep: must be a whole number from 0 to 1000"),
    (dict(min_timestep=-1), None, "min_timestep: must be a whole number from 0 to 1000"),
    (dict(min_timestep=1000), None, "min_timestep: a constant timestep"),
    (dict(ip_noise_gamma=-0.1), None, "ip_noise_gamma: must be 0 or more"),
    (dict(loss_type="mse"), None, "loss_type: 'mse' is not one of l1, l2, huber, smooth_l1"),
    (dict(loss_type="huber", huber_schedule="linear"), None, "huber_schedule: 'linear' is not one of"),
    (dict(loss_type="huber", huber_c=0.0), None, "huber_c: must be above 0"),
    (dict(loss_type="smooth_l1", huber_scale=0), None, "huber_scale: must be above 0"),
    (dict(scale_v_pred_loss_like_noise_pred=True), False, "scale_v_pred_loss_like_noise_pred: needs a v-prediction"),
    (dict(v_pred_like_loss=0.1), True, "v_pred_like_loss: cannot be used with v_parameterization"),
    (dict(zero_terminal_snr=True, min_snr_gamma=5.0), False, "min_snr_gamma: with zero_terminal_snr"),
    (dict(zero_terminal_snr=True, debiased_estimation_loss=True), False, "debiased_estimation_loss: with zero_t"),
])
def test_bad_settings_are_one_line_errors(settings, v, needle):
    errors, _ = _problems(v, **settings)
    assert len(errors) == 1 and errors[0].startswith(needle), errors
    assert "\n" not in errors[0]


def test_good_settings_and_warnings():
    assert _problems(True, zero_terminal_snr=True, min_snr_gamma=5.0, debiased_estimation_loss=True,
                     scale_v_pred_loss_like_noise_pred=True, loss_type="huber", min_timestep=0,
                     max_timestep=1000) == ([], [])
    assert _problems(False, min_timestep=500, max_timestep=500, v_pred_like_loss=0.1, noise_offset=0.1,
                     adaptive_noise_scale=-0.5, loss_type="l1", huber_c=0.0) == ([], [])
    # an epsilon model never reaching the zero-SNR timestep may weight by SNR; kohya's warning stays
    errors, warnings = _problems(False, zero_terminal_snr=True, min_snr_gamma=5.0, max_timestep=999)
    assert errors == [] and len(warnings) == 1 and warnings[0].startswith("zero_terminal_snr is on")
    _, warnings = _problems(None, noise_offset_random_strength=True, ip_noise_gamma_random_strength=True)
    assert warnings == ["noise_offset_random_strength has no effect without noise_offset",
                        "ip_noise_gamma_random_strength has no effect without ip_noise_gamma"]


# --------------------------------------------------------------------------------------- tiny trainings


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("noise_loss") / "data", folder="1_sks shape", count=2)


def _metadata(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.mark.slow
def test_v_prediction_zero_terminal_snr_training(tiny_sd2_diffusers, data, tmp_path):
    """The NoobAI-XL v-pred recipe on a tiny v-prediction model, with most options on and a sample image."""
    from sd_scripts.training.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 64 --d 1 --s 2\n", encoding="utf-8")
    result = train(tiny_config(
        tiny_sd2_diffusers, data, tmp_path / "out", max_train_steps=2, zero_terminal_snr=True,
        noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01, ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True, loss_type="huber", huber_schedule="snr", min_snr_gamma=5.0,
        debiased_estimation_loss=True, scale_v_pred_loss_like_noise_pred=True, min_timestep=900,
        sample_prompts=str(prompts), sample_every_n_steps=2,
    ))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert not any("zero_terminal_snr" in w for w in result.warnings)
    assert result.sample_files and all(Path(p).is_file() for p in result.sample_files)
    md = _metadata(result.output_path)
    assert md["ss_base_model_version"] == "sd_v2_v"
    assert (md["ss_zero_terminal_snr"], md["ss_ip_noise_gamma"], md["ss_ip_noise_gamma_random_strength"]) == (
        "True", "0.1", "True")
    assert (md["ss_noise_offset"], md["ss_noise_offset_random_strength"], md["ss_adaptive_noise_scale"]) == (
        "0.05", "True", "0.01")
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_huber_scale"]) == (
        "huber", "snr", "0.1", "1.0")
    assert md["ss_debiased_estimation"] == "True" and md["ss_min_snr_gamma"] == "5.0"


@pytest.mark.slow
def test_epsilon_training_with_loss_options(tiny_sd1_diffusers, data, tmp_path):
    from sd_scripts.training.loop import train

    result = train(tiny_config(
        tiny_sd1_diffusers, data, tmp_path / "out", max_train_steps=2, loss_type="smooth_l1",
        huber_schedule="exponential", huber_c=0.2, huber_scale=1.5, v_pred_like_loss=0.1, min_snr_gamma=5.0,
        min_timestep=500, max_timestep=500, zero_terminal_snr=True,
    ))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert any(w.startswith("zero_terminal_snr is on") for w in result.warnings)  # kohya's warning
    md = _metadata(result.output_path)
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_huber_scale"]) == (
        "smooth_l1", "exponential", "0.2", "1.5")
    assert md["ss_debiased_estimation"] == "False" and md["ss_ip_noise_gamma"] == "None"


@pytest.mark.slow
def test_prediction_type_checked_for_an_in_memory_model(tiny_sd1_diffusers, data, tmp_path):
    """A model handed to train() in memory: the loop checks what preflight could not."""
    from sd_scripts.core.errors import ConfigError
    from sd_scripts.models.loading import load_model
    from sd_scripts.training.loop import train

    config = tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", max_train_steps=1,
                         scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(ConfigError, match="^scale_v_pred_loss_like_noise_pred: needs a v-prediction model"):
        train(config, model=load_model(config))
    assert not (tmp_path / "out" / "tiny.safetensors").exists()


# --------------------------------------------------------------------------------------- front end


def test_main_flags_json_and_kohya_ss_files_reach_the_engine(tmp_path):
    import json

    from frontend.cli import parse_command_line
    from frontend.json_io import load_settings_file
    from frontend.resolve import resolve_settings
    from frontend.settings_map import to_train_config

    given, _ = parse_command_line(["--zero_terminal_snr", "--v_parameterization", "--loss_type", "huber",
                                   "--huber_schedule", "exponential", "--ip_noise_gamma", "0.1",
                                   "--min_timestep", "100", "--debiased_estimation_loss"])
    config = to_train_config(resolve_settings(given).store, has_cuda=False, has_xformers=False).config
    assert (config.zero_terminal_snr, config.v_parameterization, config.loss_type, config.huber_schedule) == (
        True, True, "huber", "exponential")
    assert (config.ip_noise_gamma, config.min_timestep, config.max_timestep, config.debiased_estimation_loss) == (
        0.1, 100, None, True)
    assert (config.huber_c, config.huber_scale, config.adaptive_noise_scale) == (0.1, 1.0, None)  # kohya's defaults

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"loss_type": "smooth_l1", "noise_offset": 0.05, "adaptive_noise_scale": 0.01,
                               "noise_offset_random_strength": True}), encoding="utf-8")
    config = to_train_config(resolve_settings({"load_json_path": str(job)}).store, has_cuda=False,
                             has_xformers=False).config
    assert (config.loss_type, config.adaptive_noise_scale, config.noise_offset_random_strength) == (
        "smooth_l1", 0.01, True)
    # a kohya_ss GUI file writes 0 for "off" in these boxes
    gui = tmp_path / "gui.json"
    gui.write_text(json.dumps({"LoRA_type": "Standard", "pretrained_model_name_or_path": "m.safetensors",
                               "train_data_dir": "IMGS", "noise_offset_type": "Original", "noise_offset": 0,
                               "adaptive_noise_scale": 0, "ip_noise_gamma": 0, "v_pred_like_loss": 0,
                               "loss_type": "huber", "huber_c": 0.2, "min_timestep": 0, "max_timestep": 1000,
                               "debiased_estimation_loss": True}), encoding="utf-8")
    values = load_settings_file(str(gui)).values
    assert not {"adaptive_noise_scale", "ip_noise_gamma", "v_pred_like_loss"} & set(values)
    assert (values["loss_type"], values["huber_c"], values["max_timestep"]) == ("huber", 0.2, 1000)


def test_kohya_command_line_has_the_flags():
    from sd_scripts.train_network import config_from_args

    config = config_from_args(["--zero_terminal_snr", "--loss_type", "smooth_l1", "--huber_c", "0.2",
                               "--ip_noise_gamma_random_strength", "--max_timestep", "900", "--v_pred_like_loss",
                               "0.1"])
    assert (config.zero_terminal_snr, config.loss_type, config.huber_c) == (True, "smooth_l1", 0.2)
    assert (config.ip_noise_gamma_random_strength, config.max_timestep, config.v_pred_like_loss) == (True, 900, 0.1)


def test_a_zero_terminal_snr_checkpoint_is_recognised(data, tmp_path):
    """NoobAI-XL v-pred style: ``v_pred`` and ``ztsnr`` marker keys in a single-file checkpoint."""
    from safetensors.torch import load_file, save_file

    from sd_scripts.models.loading import detect_family
    from sd_scripts.training.preflight import preflight
    from sd_scripts.testing.tiny_models import save_tiny_single_file, tiny_tokenizer_cache_dir

    path = save_tiny_single_file(tmp_path / "model.safetensors", "sd1")
    path.with_suffix(".yaml").unlink()
    weights = load_file(str(path))
    save_file({**weights, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(path))
    config = tiny_config(path, data, tmp_path / "out", tokenizer_cache_dir=str(tiny_tokenizer_cache_dir(path)))
    _, info = detect_family(config)
    assert info["v_parameterization"] and info["trained_zero_terminal_snr"]
    assert any(w.startswith("zero_terminal_snr: the model was trained with zero terminal SNR")
               for w in preflight(config).warnings)
    assert not any("zero_terminal_snr" in w for w in preflight(config.replace(zero_terminal_snr=True)).warnings)
