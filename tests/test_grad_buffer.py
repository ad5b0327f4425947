"""The gradients in one flat buffer on a CPU (``training/grad_buffer.py``): the same steps as torch's
``zero_grad(set_to_none=True)`` and ``clip_grad_norm_``, parameters the backward pass did not reach included."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)


def _steps(first, second, buffer: bool, max_norm: float = 0.05):
    """Three AdamW steps (weight decay on): the second layer is used only in the first one, and the third step
    accumulates two backward passes; returns the parameters and the norms."""
    from accelerate import Accelerator

    from sd_scripts.training.grad_buffer import GradBuffer

    params = [*first.parameters(), *second.parameters()]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    grads = GradBuffer.for_run(Accelerator(cpu=True), params) if buffer else None
    assert (grads is not None) == buffer
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    norms = []
    for step, passes in enumerate((1, 1, 2)):
        for _ in range(passes):
            hidden = first(x)
            out = second(hidden).square().mean() if step == 0 else hidden.square().mean()
            out.backward()
        if grads is not None:
            grads.settle()
            norms.append(grads.clip(max_norm))
            opt.step()
            grads.zero()
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
    if grads is not None:
        grads.release()
    return [p.detach().clone() for p in params], norms


def test_buffer_steps_like_set_to_none_and_clip_grad_norm():
    plain, plain_norms = _steps(*_toy(), buffer=False)
    ours, our_norms = _steps(*_toy(), buffer=True)
    for a, b in zip(plain_norms, our_norms):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    for a, b in zip(plain, ours):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_an_unreached_parameter_has_no_gradient_at_the_step_and_is_left_alone():
    from accelerate import Accelerator

    from sd_scripts.training.grad_buffer import GradBuffer

    first, second = _toy()
    params = [*first.parameters(), *second.parameters()]
    grads = GradBuffer.for_run(Accelerator(cpu=True), params)
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in params)
    first(torch.randn(2, 6)).sum().backward()
    grads.settle()
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    assert second.weight.grad is None and second.bias.grad is None
    before = second.weight.detach().clone()
    torch.optim.AdamW(params, lr=0.1, weight_decay=0.5).step()
    assert torch.equal(second.weight, before)  # AdamW skips a parameter without a gradient, weight decay included
    grads.zero()
    assert all(p.grad is v for p, v in zip(params, grads.views)) and float(grads.flat.abs().sum()) == 0
    grads.release()
    assert all(p.grad is None for p in params)


def test_buffer_only_where_it_is_exact():
    from accelerate import Accelerator

    from sd_scripts.training.grad_buffer import GradBuffer

    accelerator = Accelerator(cpu=True)
    a = torch.nn.Parameter(torch.zeros(3))
    assert GradBuffer.for_run(accelerator, []) is None
    assert GradBuffer.for_run(accelerator, [a, torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]) is None
    assert GradBuffer.for_run(accelerator, [a, a]) is None
    a.grad = torch.ones(3)
    assert GradBuffer.for_run(accelerator, [a]) is None  # a gradient already there is not thrown away


def _train(model, tmp_path, name, **overrides):
    from sd_scripts.training.loop import train

    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, count=4)
    values = dict(max_train_steps=4, cache_latents=True, train_batch_size=1, max_grad_norm=0.01,
                  network_args=["module_dropout=0.5"], gradient_accumulation_steps=2)
    values.update(overrides)
    return train(tiny_config(model, data, tmp_path / name, **values))


def test_training_with_the_buffer_gives_the_same_lora(tiny_sd1_diffusers, tmp_path, monkeypatch):
    """module_dropout leaves some LoRA modules out of a step (no gradient), gradient accumulation adds two batches,
    and a low max_grad_norm clips every step: the LoRA is the one trained without the buffer, to float rounding."""
    from sd_scripts.training import grad_buffer

    made = []
    real = grad_buffer.GradBuffer.for_run.__func__
    monkeypatch.setattr(grad_buffer.GradBuffer, "for_run",
                        classmethod(lambda cls, *a: made.append(real(cls, *a)) or made[-1]))
    with_buffer = _train(tiny_sd1_diffusers, tmp_path, "buffer")
    assert made and made[0] is not None
    monkeypatch.setattr(grad_buffer.GradBuffer, "for_run", classmethod(lambda cls, *a: None))
    without = _train(tiny_sd1_diffusers, tmp_path, "plain")
    a, b = load_file(with_buffer.output_path), load_file(without.output_path)
    assert a.keys() == b.keys()
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.endswith("lora_up.weight"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert with_buffer.losses == pytest.approx(without.losses, rel=1e-6)
