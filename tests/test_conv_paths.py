"""cpu_conv_paths: the frozen UNet's convolutions on a CPU take the path measured fastest for their shape, with the
same values as PyTorch's own pick up to float rounding, a repeatable run and an exact resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.test_speed_options import _max_difference
from tests.test_speed_options import _train as train_tiny


def test_the_rule_follows_the_measured_shapes():
    from sd_scripts.models.conv_paths import conv_path

    # batch 1, weights of 10M elements or more, outputs up to 16x16: im2col (oneDNN NCHW took 2-4x its time)
    assert conv_path(1, (1280, 2560, 3, 3), 4 * 4) == "im2col"
    assert conv_path(1, (1280, 1280, 3, 3), 16 * 16) == "im2col"
    assert conv_path(1, (640, 1920, 3, 3), 8 * 8) == "im2col"
    # larger outputs, smaller weights and larger batches keep PyTorch's pick
    assert conv_path(1, (1280, 1280, 3, 3), 32 * 32) == "torch"
    assert conv_path(1, (640, 1280, 3, 3), 8 * 8) == "torch"
    assert conv_path(4, (1280, 2560, 3, 3), 4 * 4) == "torch"
    # 1x1 convolutions with outputs of 2x2 or fewer, any batch: oneDNN channels_last
    assert conv_path(1, (1280, 2560, 1, 1), 2 * 2) == "channels_last"
    assert conv_path(4, (1280, 1280, 1, 1), 2 * 2) == "channels_last"
    assert conv_path(1, (1280, 1280, 1, 1), 4 * 4) == "torch"
    assert conv_path(1, (320, 320, 1, 1), 2 * 2) == "channels_last"  # the narrowest of SD1.x/SD2.x/SDXL
    assert conv_path(1, (64, 64, 1, 1), 2 * 2) == "torch"  # narrow (test-sized) 1x1 weights: slower there


def _values_and_input_gradient(conv, x, patched: bool):
    from sd_scripts.models.conv_paths import remove_cpu_conv_paths, use_cpu_conv_paths

    (use_cpu_conv_paths if patched else remove_cpu_conv_paths)(conv)
    x = x.clone().requires_grad_(True)
    out = conv(x)
    out.square().sum().backward()
    return out.detach(), x.grad


def test_each_path_gives_pytorch_s_values_and_input_gradients():
    from sd_scripts.models import conv_paths

    torch.manual_seed(0)
    seen = []
    real = conv_paths.conv_path
    conv_paths_rule = lambda *a: seen.append(real(*a)) or seen[-1]  # noqa: E731
    cases = [
        (torch.nn.Conv2d(1280, 1024, 3, padding=1), torch.randn(1, 1280, 4, 4), "im2col"),
        (torch.nn.Conv2d(1280, 1024, 3, stride=2, padding=1), torch.randn(1, 1280, 8, 8), "im2col"),
        (torch.nn.Conv2d(320, 256, 1), torch.randn(3, 320, 2, 2), "channels_last"),
        (torch.nn.Conv2d(320, 256, 1), torch.randn(1, 320, 16, 16), "torch"),
    ]
    try:
        conv_paths.conv_path = conv_paths_rule
        for conv, x, path in cases:
            conv.requires_grad_(False)
            want_out, want_grad = _values_and_input_gradient(conv, x, patched=False)
            seen.clear()
            got_out, got_grad = _values_and_input_gradient(conv, x, patched=True)
            assert seen == [path]
            assert got_out.is_contiguous() and got_grad.is_contiguous()
            scale = float(want_out.abs().max())
            assert float((got_out - want_out).abs().max()) <= 1e-5 * scale, path
            assert float((got_grad - want_grad).abs().max()) <= 1e-5 * float(want_grad.abs().max()), path
    finally:
        conv_paths.conv_path = real


def test_trained_grouped_small_and_autocast_convolutions_keep_pytorch_s_path():
    from sd_scripts.models.conv_paths import use_cpu_conv_paths

    trained = torch.nn.Conv2d(1280, 1024, 3, padding=1)  # a LoCon's convolution trains: never patched
    grouped = torch.nn.Conv2d(64, 64, 1, groups=4).requires_grad_(False)
    small = torch.nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)  # no input gives it another path
    frozen = torch.nn.Conv2d(1280, 1024, 3, padding=1).requires_grad_(False)
    pointwise = torch.nn.Conv2d(320, 320, 1).requires_grad_(False)  # another path at outputs of 2x2 or fewer
    narrow = torch.nn.Conv2d(64, 64, 1).requires_grad_(False)  # a narrow 1x1 stays on PyTorch's pick
    model = torch.nn.ModuleList([trained, grouped, small, frozen, pointwise, narrow])
    assert use_cpu_conv_paths(model) == 2
    assert "_conv_forward" in vars(frozen) and "_conv_forward" in vars(pointwise)
    assert "_conv_forward" not in vars(trained) | vars(grouped) | vars(small) | vars(narrow)
    x = torch.randn(1, 1280, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen(x).dtype is torch.bfloat16  # autocast still decides the dtype


def _train(model, tmp_path, name, **overrides):
    return train_tiny(model, tmp_path, name, **dict({"train_batch_size": 1}, **overrides))[0]


def test_training_with_the_paths_gives_the_same_lora_and_an_exact_resume(tiny_sd1_diffusers, tmp_path, monkeypatch):
    """The tiny UNet's convolutions are far below the rule's sizes, so the thresholds are opened up: every frozen
    convolution takes im2col (3x3) or channels_last (1x1), as the full-size UNet's deep levels do."""
    from sd_scripts.models import conv_paths

    taken = []
    real = conv_paths.conv_path
    monkeypatch.setattr(conv_paths, "BIG_WEIGHT", 0)
    monkeypatch.setattr(conv_paths, "SMALL_OUTPUT", 10**9)
    monkeypatch.setattr(conv_paths, "TINY_OUTPUT", 10**9)
    monkeypatch.setattr(conv_paths, "WIDE_POINTWISE", 0)
    monkeypatch.setattr(conv_paths, "conv_path", lambda *a: taken.append(real(*a)) or taken[-1])
    for optimizer, tolerance in (("SGD", 1e-6), ("AdamW", 1e-4)):
        taken.clear()
        plain = _train(tiny_sd1_diffusers, tmp_path, f"plain_{optimizer}", optimizer_type=optimizer,
                       cpu_conv_paths=False)
        assert not taken
        paths = _train(tiny_sd1_diffusers, tmp_path, f"paths_{optimizer}", optimizer_type=optimizer)
        assert {"im2col", "channels_last"} <= set(taken)
        assert _max_difference(plain.output_path, paths.output_path) <= tolerance, optimizer
    again = _train(tiny_sd1_diffusers, tmp_path, "again", optimizer_type="AdamW")
    assert _max_difference(paths.output_path, again.output_path) == 0.0
    saved = _train(tiny_sd1_diffusers, tmp_path, "saved", optimizer_type="AdamW", save_every_n_steps=2, save_state=True)
    state = next(p for p in saved.state_paths if "step00000002" in p)
    resumed = _train(tiny_sd1_diffusers, tmp_path, "resumed", optimizer_type="AdamW", save_every_n_steps=2,
                     save_state=True, resume=state)
    assert _max_difference(saved.output_path, resumed.output_path) == 0.0
