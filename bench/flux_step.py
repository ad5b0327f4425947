"""FLUX.1 cases of ``bench/train_step.py`` (``--only flux``, ``--gpu --only flux``): our loop against a bare loop.

CPU (``--only flux``):

* ``tiny``: the tiny FLUX.1 of the tests (hidden 64, 2 + 2 blocks) at 64 px;
* ``blocks``: FLUX.1's full-width blocks (hidden 3072, 24 heads, MLP 12288), one double-stream and one single-stream
  block, at 256 px with 512 T5 tokens, bf16 autocast: the block-level figure. A full model is 19 + 38 such blocks,
  so its step is about 19 x (double) + 38 x (single) of these (the embedders are 0.6% of the weights).

GPU (``--gpu --only flux``): the full-size FLUX.1 transformer (random weights) at 512 and 1024 px, batch 1, with
``fp8_base`` and gradient checkpointing, ``blocks_to_swap`` 0, 8 and 16: images/s, peak VRAM, and the share of the
card's bf16 peak, counting ``6 x 11.9e9 x image tokens`` FLOP per image per step (3e14 at 1024 px; the
recomputation of checkpointing is not counted as useful work).

Both loops use the same transformer and the same LoRA (``networks.lora``, dim 16, block linears), cached latents
and text-encoder outputs (CLIP-L and T5 are the tiny ones: their outputs are cached, so only the transformer's
input width 4096 -> 32 of ``txt_in`` differs from a real model), AdamW, one batch repeated.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

FLUX_PARAMS_PER_IMAGE_TOKEN_FLOP = 6 * 11.9e9  # forward + backward, per image token (the estimate)


def build_flux(kind: str, dev: bool = True):
    """A LoadedModel: ``tiny`` (the tests' model), ``blocks`` (full width, 1 + 1 blocks) or ``full`` (19 + 38)."""
    import torch

    from sd_scripts.core.config import TrainConfig
    from sd_scripts.models.checkpoint_io import LoadedModel
    from sd_scripts.models.families import get_family
    from sd_scripts.models.flux.transformer import FluxTransformer
    from sd_scripts.testing.tiny_flux import build_tiny_flux, tiny_flux_params

    parts = build_tiny_flux(dev)
    family = get_family("flux")
    transformer = parts["transformer"]
    if kind != "tiny":
        tiny = tiny_flux_params(dev)
        depth, single = (1, 1) if kind == "blocks" else (19, 38)
        params = dataclasses.replace(tiny, hidden_size=3072, num_heads=24, depth=depth, depth_single_blocks=single,
                                     axes_dim=(16, 56, 56))
        torch.manual_seed(0)
        with torch.device("meta"):
            transformer = FluxTransformer(params)
        transformer.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in transformer.parameters():
                p.normal_(0.0, 0.02, generator=g)
    transformer.requires_grad_(False)
    return LoadedModel(family=family, unet=transformer, vae=parts["vae"],
                       text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
                       tokenizers=[parts["tokenizer"], parts["tokenizer_2"]], v_parameterization=False,
                       model_path=f"flux-{kind}-random", info={"flux_variant": "dev" if dev else "schnell"},
                       options=family.training_options(TrainConfig()))


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def on_progress(self, step, total, loss, lr, epoch):
        self.times.append(time.perf_counter())


def flux_config(data: Path, out: Path, size: int, batch: int, steps: int, **extra):
    from sd_scripts.core.config import TrainConfig

    values = dict(train_data_dir=str(data), output_dir=str(out), output_name="bench", model_family="flux",
                  resolution=str(size), min_bucket_reso=size, max_bucket_reso=size, bucket_reso_steps=64,
                  train_batch_size=batch, max_train_steps=steps, network_module="networks.lora", network_dim=16,
                  network_alpha=8, network_train_unet_only=True, cache_latents=True, cache_text_encoder_outputs=True,
                  optimizer_type="AdamW", seed=1, max_grad_norm=1.0, clip_skip=None, model_prediction_type="raw",
                  timestep_sampling="sigmoid", guidance_scale=1.0)
    values.update(extra)
    return TrainConfig(**values)


def time_ours(base, data: Path, out: Path, size: int, batch: int, steps: int, **extra) -> float:
    from sd_scripts.training.loop import train

    model = copy.copy(base)
    model.unet = copy.deepcopy(base.unet)  # the loop leaves its network attached: each run gets a clean transformer
    timer = StepTimer()
    train(flux_config(data, out, size, batch, steps, pretrained_model_name_or_path=base.model_path, **extra), timer,
          model=model)
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:])][1:]  # the first (warm-up) step dropped
    return statistics.median(gaps)


def time_bare(base, size: int, batch: int, steps: int, device, dtype, t5_tokens: int = 512,
              gradient_checkpointing: bool = False) -> float:
    """The transformer with the same LoRA: forward, flow-matching loss, backward, AdamW step; nothing else."""
    import torch
    import torch.nn.functional as F

    from sd_scripts.models.flux.packing import image_ids, text_ids
    from sd_scripts.networks.factory import build_network

    transformer = copy.deepcopy(base.unet).to(device).requires_grad_(False)  # frozen, as the loop freezes it
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        transformer.train()
    config = flux_config(Path("."), Path("."), size, batch, steps)
    model = copy.copy(base)
    model.unet = transformer
    built = build_network(config, model, train_unet=True, train_text_encoder=False)
    network = built.network
    network.to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    p = transformer.params
    h = w = size // 8
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, (h // 2) * (w // 2), p.in_channels, generator=g).to(device)
    target = torch.randn(img.shape, generator=g).to(device)
    txt = torch.randn(batch, t5_tokens, p.context_in_dim, generator=g).to(device)
    y = torch.randn(batch, p.vec_in_dim, generator=g).to(device)
    ids_img, ids_txt = image_ids(batch, h, w, device=device), text_ids(batch, t5_tokens, device=device)
    t = torch.rand(batch, generator=g).to(device)
    guidance = torch.full((batch,), 1.0, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            pred = transformer(img, ids_img, txt, ids_txt, t, y, guidance)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    network.remove()
    if gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    return statistics.median(times[1:])


def compare_cpu(kind: str, size: int, batch: int, steps: int, rounds: int, make_images, peak_memory_mb) -> None:
    import torch

    device = torch.device("cpu")
    base = build_flux(kind)
    dtype = torch.bfloat16 if kind == "blocks" else torch.float32
    precision = "bf16" if kind == "blocks" else "no"
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", size, count=max(4, batch * 2))
        ours, bare = [], []
        for r in range(rounds):
            bare.append(time_bare(base, size, batch, steps, device, dtype))
            ours.append(time_ours(base, data, Path(tmp) / f"out{r}", size, batch, steps, mixed_precision=precision))
        o, b = min(ours), min(bare)
        print(f"flux {kind:6s} {size:4d}px batch {batch} ({precision}): ours {o:.3f} s/step, bare {b:.3f} s/step, "
              f"ratio {o / b:.3f}, peak RSS {peak_memory_mb(device):.0f} MiB  (min of {rounds} rounds, median of "
              f"{steps - 1} steps)", flush=True)


def gpu_flux(steps: int, make_images, peak_memory_mb, bf16_peak: dict) -> None:
    """Full-size FLUX.1 on CUDA: 512 and 1024 px, fp8_base, blocks_to_swap 0/8/16 (see the module docstring)."""
    import torch

    from sd_scripts.models.flux.memory import store_flux_weights_fp8

    if not torch.cuda.is_available():
        print("--gpu --only flux: no CUDA device here")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in bf16_peak.items() if k in name), None)
    base = build_flux("full")
    store_flux_weights_fp8(base.unet)  # fp8_base, as the loader does for a file
    with tempfile.TemporaryDirectory() as tmp:
        for size in (512, 1024):
            data = make_images(Path(tmp) / f"data{size}", size, count=4)
            for swap in (0, 8, 16):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    ours = time_ours(base, data, Path(tmp) / f"out{size}_{swap}", size, 1, steps, mixed_precision="bf16",
                                     fp8_base=True, gradient_checkpointing=True, blocks_to_swap=swap)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name} flux {size}px blocks_to_swap {swap}: out of memory", flush=True)
                    continue
                mem = peak_memory_mb(device)
                flop = FLUX_PARAMS_PER_IMAGE_TOKEN_FLOP * (size // 16) ** 2
                share = f", {flop / ours / peak * 100:.1f}% of bf16 peak" if peak else ""
                print(f"{name} flux {size}px batch 1 fp8_base blocks_to_swap {swap}: {ours:.3f} s/step "
                      f"({1 / ours:.2f} img/s{share}), peak VRAM {mem:.0f} MiB", flush=True)
            if size == 1024:
                torch.cuda.reset_peak_memory_stats()
                bare = time_bare(base, size, 1, steps, device, torch.bfloat16, gradient_checkpointing=True)
                print(f"{name} flux {size}px bare loop (no swap): {bare:.3f} s/step, peak VRAM "
                      f"{peak_memory_mb(device):.0f} MiB", flush=True)
