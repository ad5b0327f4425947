"""Speed options keep the results: channels_last, torch_compile (regional), bf16 on a CPU that computes it, fused or
multi-tensor optimizer steps; the VAE leaves memory after caching; peak memory is reported per phase."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_dataset, tiny_config


class Messages:
    def __init__(self):
        self.lines: list[str] = []

    def on_message(self, text):
        self.lines.append(text)


def _train(model, tmp_path, name, **overrides):
    from sd_scripts.training.loop import train

    messages = Messages()
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, count=4)
    values = dict(max_train_steps=3, cache_latents=True, network_train_unet_only=True)
    values.update(overrides)
    result = train(tiny_config(model, data, tmp_path / name, **values), messages)
    return result, messages.lines


def _max_difference(a_path, b_path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------ machine facts


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", "native"),
    ("processor: 0\nflags\t\t: fpu sse avx2 amx_bf16\n", "native"),
    ("processor: 0\nflags\t\t: fpu sse avx2 fma\n", "emulated"),
    ("processor: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", "native"),
    ("processor: 0\nFeatures\t: fp asimd\n", "emulated"),
])
def test_cpu_bf16_support_reads_the_cpu_flags(cpuinfo, expected):
    from sd_scripts.training.speed import cpu_bf16_support

    assert cpu_bf16_support(cpuinfo) == expected


def test_frozen_weights_are_half_on_cuda_and_bf16_on_a_native_cpu_only():
    from sd_scripts.training.speed import bf16_cpu_note, frozen_weight_dtype

    assert frozen_weight_dtype("bf16", "cuda") is torch.bfloat16
    assert frozen_weight_dtype("fp16", "cuda") is torch.float16
    assert frozen_weight_dtype("bf16", "cpu", "native") is torch.bfloat16
    assert frozen_weight_dtype("bf16", "cpu", "emulated") is torch.float32
    assert frozen_weight_dtype("fp16", "cpu", "native") is torch.float32
    assert frozen_weight_dtype("no", "cuda") is torch.float32
    assert bf16_cpu_note("bf16", "cpu", "native").startswith("bf16 on CPU: native")
    assert bf16_cpu_note("bf16", "cpu", "emulated").startswith("bf16 on CPU: emulated, slower")
    assert bf16_cpu_note("no", "cpu", "native") is None and bf16_cpu_note("bf16", "cuda") is None


def test_optimizer_steps_are_fused_or_foreach_where_torch_has_them():
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.optimizers import build_optimizer
    from sd_scripts.training.speed import optimizer_speed_kwargs

    assert optimizer_speed_kwargs(torch.optim.AdamW, "cuda", {}) == {"fused": True}
    assert optimizer_speed_kwargs(torch.optim.AdamW, "cpu", {}) == {"fused": True}
    assert optimizer_speed_kwargs(torch.optim.SGD, "cpu", {}) == {"fused": True}
    assert optimizer_speed_kwargs(torch.optim.RAdam, "cpu", {}) == {"foreach": True}
    assert optimizer_speed_kwargs(torch.optim.AdamW, "cpu", {"foreach": False}) == {}
    assert optimizer_speed_kwargs(type("Lion", (torch.optim.Optimizer,), {"__module__": "lion_pytorch"}), "cpu", {}) == {}
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    built = build_optimizer(TrainConfig(optimizer_type="AdamW", learning_rate=1e-3), [{"params": params}])
    assert built.optimizer.param_groups[0]["fused"] is True
    assert "fused" not in built.ss_optimizer  # the metadata lists the user's optimizer_args only
    kept = build_optimizer(TrainConfig(optimizer_type="AdamW", learning_rate=1e-3, optimizer_args=["foreach=False"]),
                           [{"params": params}])
    assert kept.optimizer.param_groups[0]["foreach"] is False and not kept.optimizer.param_groups[0]["fused"]


def test_fused_and_foreach_adamw_steps_match_the_single_tensor_step():
    torch.manual_seed(0)
    weights = [torch.randn(8, 4), torch.randn(4)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    results = []
    for options in ({"foreach": False}, {"fused": True}, {"foreach": True}):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, **options)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("scale", [1e-3, 100.0])
def test_gradient_clipping_gives_torch_s_norm_and_gradients_bit_for_bit(dtypes, scale):
    """One device and dtype takes the short path (torch's operations without its grouping); mixed dtypes go through
    torch's ``clip_grad_norm_``; both give what torch gives."""
    from accelerate import Accelerator

    from sd_scripts.training.speed import clip_gradients

    torch.manual_seed(0)
    shapes = [(17, 5), (3,), (4, 4, 3, 3), (2, 8)]
    grads = [(torch.randn(shape) * scale).to(dtypes[i % len(dtypes)]) for i, shape in enumerate(shapes)]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    ours.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: left out, as torch does
    norm = clip_gradients(Accelerator(cpu=True), ours, 1.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert ours[-1].grad is None


def test_batches_read_from_memory_take_no_loader_process(tiny_sd1_diffusers, tmp_path, monkeypatch):
    """Cached latents: the loader runs in the training process whatever max_data_loader_n_workers says (a worker
    would only add the cost of sending each batch); images read from disk keep the workers, one per CPU at most.
    The count never changes the LoRA: each batch draws from its own generator."""
    import os

    import torch.utils.data

    from sd_scripts.training.data_loader import loader_workers

    assert loader_workers(8, items_in_memory=True) == 0
    assert loader_workers(8, items_in_memory=False) == min(8, os.cpu_count() or 1)
    assert loader_workers(0, items_in_memory=False) == 0
    built = []
    real_init = torch.utils.data.DataLoader.__init__

    def record(self, *args, **kwargs):
        built.append(kwargs.get("num_workers"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", record)
    options = dict(max_data_loader_n_workers=1, persistent_data_loader_workers=True, max_train_steps=2,
                   caption_dropout_rate=0.5, shuffle_caption=True)
    _train(tiny_sd1_diffusers, tmp_path, "cached", **options)
    assert set(built) == {0}  # ours, and accelerate's copy of it
    built.clear()
    read, _ = _train(tiny_sd1_diffusers, tmp_path, "read", **dict(options, cache_latents=False))
    assert set(built) == {1}
    here, _ = _train(tiny_sd1_diffusers, tmp_path, "here",
                     **dict(options, cache_latents=False, max_data_loader_n_workers=0))
    assert _max_difference(read.output_path, here.output_path) == 0.0


# --------------------------------------------------------------------------------------------- training


def test_channels_last_trains_the_same_lora(tiny_sd1_diffusers, tmp_path):
    """NHWC convolutions add up in another order: float rounding only. SGD carries it through linearly (within
    1e-6); Adam divides by the gradients' running size, so a near-zero gradient's rounding moves its weight by up to
    about lr/100 in the first steps (within 1e-4 at lr 1e-3)."""
    for optimizer, tolerance in (("SGD", 1e-6), ("AdamW", 1e-4)):
        plain, _ = _train(tiny_sd1_diffusers, tmp_path, f"plain_{optimizer}", optimizer_type=optimizer)
        nhwc, lines = _train(tiny_sd1_diffusers, tmp_path, f"nhwc_{optimizer}", optimizer_type=optimizer,
                             channels_last=True)
        assert any(line.startswith("channels_last: ") for line in lines), lines
        assert _max_difference(plain.output_path, nhwc.output_path) <= tolerance, optimizer


def test_native_bf16_cpu_keeps_the_frozen_weights_in_bf16_and_the_network_in_float32(tiny_sd1_diffusers, tmp_path,
                                                                                        monkeypatch):
    from sd_scripts.models import loading
    from sd_scripts.networks import factory
    from sd_scripts.training import speed

    seen = []
    real_load, real_build = loading.load_model, factory.build_network
    monkeypatch.setattr(loading, "load_model", lambda config, **kw: seen.append(real_load(config, **kw)) or seen[-1])
    monkeypatch.setattr(factory, "build_network", lambda *a, **kw: seen.append(real_build(*a, **kw)) or seen[-1])
    monkeypatch.setattr(speed, "cpu_bf16_support", lambda cpuinfo=None: "native")
    result, lines = _train(tiny_sd1_diffusers, tmp_path, "native", mixed_precision="bf16", max_train_steps=2)
    model, built = seen
    assert any(line.startswith("bf16 on CPU: native") for line in lines), lines
    assert model.unet.dtype is torch.bfloat16 and model.text_encoders[0].dtype is torch.bfloat16
    assert all(p.dtype is torch.float32 for p in built.network.parameters())
    assert result.losses and all(abs(x) < 1e3 for x in result.losses)

    monkeypatch.setattr(speed, "cpu_bf16_support", lambda cpuinfo=None: "emulated")
    seen.clear()
    _, lines = _train(tiny_sd1_diffusers, tmp_path, "emulated", mixed_precision="bf16", max_train_steps=1)
    assert any(line.startswith("bf16 on CPU: emulated, slower") for line in lines), lines
    assert seen[0].unet.dtype is torch.float32


def test_the_vae_leaves_after_caching_unless_samples_need_it_and_memory_is_reported_per_phase(tiny_sd1_diffusers,
                                                                                              tmp_path, monkeypatch):
    from sd_scripts.models import loading

    seen = []
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda config, **kw: seen.append(real_load(config, **kw)) or seen[-1])
    _, lines = _train(tiny_sd1_diffusers, tmp_path, "cached", max_train_steps=1)
    assert seen[0].vae is None
    summary = [line for line in lines if line.startswith("peak RSS: ")]
    assert summary and all(f"{phase} " in summary[0] for phase in ("load", "cache", "train")), lines
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 2\n", encoding="utf-8")
    seen.clear()
    result, _ = _train(tiny_sd1_diffusers, tmp_path, "sampled", max_train_steps=1, sample_prompts=str(prompts))
    assert seen[0].vae is not None and result.sample_files


def test_inductor_keeps_pytorch_s_layout_on_a_cpu():
    """On a CPU inductor's layout optimization would put the convolutions in channels_last, oneDNN's slow path for
    the UNet's shapes: it is turned off there, and only there."""
    from sd_scripts.models.compile import compile_repeated_blocks, inductor_options

    assert inductor_options("inductor", "cpu") == {"layout_optimization": False}
    assert inductor_options("inductor", "cuda") is None
    assert inductor_options("aot_eager", "cpu") is None
    assert inductor_options("inductor", "cpu", "max-autotune") is None  # torch takes a mode or options, not both

    calls = []

    class ResnetBlock2D(torch.nn.Module):  # a repeated block, by its class name
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def compile(self, **options):
            calls.append(options)

    denoiser = torch.nn.Sequential(ResnetBlock2D(), torch.nn.SiLU(), ResnetBlock2D())
    assert compile_repeated_blocks(denoiser, "inductor") == 2
    assert calls == [{"backend": "inductor", "options": {"layout_optimization": False}}] * 2
    calls.clear()
    compile_repeated_blocks(denoiser, "aot_eager")
    assert calls == [{"backend": "aot_eager"}] * 2


@pytest.mark.slow
def test_torch_compile_trains_within_tolerance_with_checkpointing_sampling_and_an_exact_resume(tiny_sd1_diffusers,
                                                                                              tmp_path, monkeypatch):
    """Regional compilation (aot_eager: dynamo and autograd tracing without a C++ toolchain; the inductor backend
    adds code generation) over the injected LoRA modules, with gradient checkpointing, a sample image and a resume.
    The transformer blocks only, to keep the tracing short (the resnets compile the same way)."""
    from sd_scripts.models import compile as regional

    monkeypatch.setattr(regional, "REPEATED_BLOCKS", ("BasicTransformerBlock",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 2\n", encoding="utf-8")
    common = dict(max_train_steps=3, gradient_checkpointing=True, network_train_unet_only=False)
    eager, _ = _train(tiny_sd1_diffusers, tmp_path, "eager", **common)
    compiled_args = dict(common, torch_compile=True, dynamo_backend="aot_eager", save_every_n_steps=2, save_state=True,
                         sample_prompts=str(prompts), sample_every_n_steps=2)
    compiled, lines = _train(tiny_sd1_diffusers, tmp_path, "compiled", **compiled_args)
    assert any(line.startswith("torch_compile: ") and "repeated blocks" in line for line in lines), lines
    assert any(line.startswith("torch_compile: about ") for line in lines), lines
    assert compiled.sample_files
    assert _max_difference(eager.output_path, compiled.output_path) <= 1e-5
    state = next(p for p in compiled.state_paths if "step00000002" in p)
    resumed, _ = _train(tiny_sd1_diffusers, tmp_path, "resumed", **dict(compiled_args, resume=state))
    assert _max_difference(compiled.output_path, resumed.output_path) == 0.0


def test_streamed_safetensors_reading_gives_the_file_s_tensors(tmp_path):
    from safetensors.torch import save_file

    from sd_scripts.models.checkpoint_io import read_checkpoint

    tensors = {"b.weight": torch.randn(3, 4).half(), "a.ids": torch.arange(5), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0), "scalar": torch.tensor(3.0)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    state, metadata = read_checkpoint(str(path), streamed=True)
    assert metadata == {"format": "pt"} and state.keys() == tensors.keys()
    for key, value in tensors.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
