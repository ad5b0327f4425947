"""Flow-matching objective (kohya's FLUX.1 formulas) checked against hand computations, and the DDPM objective
against the noise functions it wraps (same draws, same order)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from sd_scripts.core.config import TrainConfig  # noqa: E402
from sd_scripts.training.objectives import (  # noqa: E402
    DDPMObjective,
    FlowMatchingObjective,
    apply_prediction_type,
    flow_loss_weights,
    flow_sigma_schedule,
    make_objective,
    sample_flow_sigmas,
)


def _cfg(**kw) -> TrainConfig:
    config = TrainConfig()
    for key, value in kw.items():
        setattr(config, key, value)
    return config


def test_shifted_schedule_by_hand():
    sched = flow_sigma_schedule(3.0)
    assert len(sched) == 1000 and sched[0].item() == 1.0
    t = 1 / 1000
    assert sched[-1].item() == pytest.approx(3 * t / (1 + 2 * t), rel=1e-6)
    t = 500 / 1000
    assert sched[500].item() == pytest.approx(3 * t / (1 + 2 * t), rel=1e-6)  # index 500 is t = 500/1000
    assert torch.equal(flow_sigma_schedule(1.0), torch.linspace(1, 1000, 1000).flip(0) / 1000)


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_sigma_sampling_methods_by_hand(method):
    config = _cfg(timestep_sampling=method, sigmoid_scale=1.7, discrete_flow_shift=3.1582)
    torch.manual_seed(3)
    got = sample_flow_sigmas(config, 4, (64, 48), "cpu", flow_sigma_schedule(3.1582))
    torch.manual_seed(3)
    if method == "uniform":
        expected = torch.rand(4)
    else:
        x = torch.randn(4)
        s = torch.sigmoid(1.7 * x)
        if method == "shift":
            s = 3.1582 * s / (1 + 2.1582 * s)
        elif method == "flux_shift":
            tokens = 32 * 24
            mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        expected = s
    assert torch.allclose(got, expected, atol=1e-6)
    assert ((got > 0) & (got <= 1)).all()


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_sampling_on_the_schedule(scheme):
    config = _cfg(timestep_sampling="sigma", weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    sched = flow_sigma_schedule(3.0)
    torch.manual_seed(5)
    got = sample_flow_sigmas(config, 6, (8, 8), "cpu", sched)
    torch.manual_seed(5)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(mean=0.3, std=0.8, size=(6,)))
    else:
        u = torch.rand(6)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.equal(got, sched[(u * 1000).long()])


def test_noising_target_and_prediction_types_by_hand():
    config = _cfg(model_prediction_type="raw", weighting_scheme="uniform")
    objective = FlowMatchingObjective(config, "cpu")
    latents = torch.randn(2, 16, 4, 4)
    noise = torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([0.25, 0.9])
    noised = objective.noised_with(latents, noise, sigmas)
    assert torch.allclose(noised.model_input[1], 0.1 * latents[1] + 0.9 * noise[1], atol=1e-6)
    assert torch.allclose(noised.timesteps, torch.tensor([250.0, 900.0]))
    pred = torch.randn(2, 16, 4, 4)
    out, target = objective.prediction_and_target(pred, noised)
    assert torch.equal(out, pred) and torch.allclose(target, noise - latents)
    assert objective.loss_weights(noised) is None
    scaled_objective = FlowMatchingObjective(_cfg(model_prediction_type="sigma_scaled", weighting_scheme="cosmap"), "cpu")
    assert torch.allclose(scaled_objective.loss_weights(noised), flow_loss_weights("cosmap", sigmas))
    s = sigmas.view(-1, 1, 1, 1)
    additive, w = apply_prediction_type("additive", pred, noised.model_input, s, "uniform")
    assert torch.allclose(additive, pred + noised.model_input) and w is None
    scaled, w = apply_prediction_type("sigma_scaled", pred, noised.model_input, s, "sigma_sqrt")
    assert torch.allclose(scaled, noised.model_input - s * pred)
    assert torch.allclose(w.flatten(), torch.tensor([16.0, 1 / 0.81]))
    cosmap = flow_loss_weights("cosmap", torch.tensor([0.25]))
    assert cosmap.item() == pytest.approx(2 / (math.pi * (1 - 0.5 + 0.125)))
    assert torch.equal(flow_loss_weights("logit_normal", sigmas), torch.ones(2))


def test_ip_noise_perturbs_the_input_not_the_target():
    objective = FlowMatchingObjective(_cfg(ip_noise_gamma=0.1), "cpu")
    latents, noise = torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2)
    torch.manual_seed(0)
    noised = objective.noised_with(latents, noise, torch.tensor([0.5]))
    torch.manual_seed(0)
    xi = torch.randn(1, 16, 2, 2)
    assert torch.allclose(noised.model_input, 0.5 * (noise + 0.1 * xi), atol=1e-6)
    assert torch.equal(objective.prediction_and_target(torch.zeros_like(noise), noised)[1], noise - latents)


def test_ddpm_objective_draws_as_the_noise_functions_do():
    from sd_scripts.training.noise import add_noise, make_noise_scheduler, sample_timesteps

    config = _cfg(min_timestep=100, max_timestep=900)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    objective = make_objective(type("F", (), {"objective": "ddpm"})(), config, False, "cpu")
    assert isinstance(objective, DDPMObjective)
    torch.manual_seed(11)
    noised = objective.noised(latents, noise)
    torch.manual_seed(11)
    timesteps = sample_timesteps(3, "cpu", min_timestep=100, max_timestep=900)
    expected = add_noise(make_noise_scheduler(False).alphas_cumprod, latents, noise, timesteps)
    assert torch.equal(noised.timesteps, timesteps) and torch.equal(noised.model_input, expected)
    assert torch.equal(objective.prediction_and_target(latents, noised)[1], noise)
