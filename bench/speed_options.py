#!/usr/bin/env python
"""Each speed option on and off, on a bare UNet + LoRA training step (not a test).

    python bench/speed_options.py                       tiny model (64 px, batch 4) and full-size SD1.5 shapes (128 px)
    python bench/speed_options.py --only sd15 --batch 2 --size 256
    python bench/speed_options.py --options base,channels_last,compile
    python bench/speed_options.py --optimizer_step      AdamW's step alone: single-tensor, foreach, fused

Options (each against ``base``: float32 weights, no autocast, eager):

* ``cpu_conv_paths``: each frozen convolution on the path measured fastest for its shape (``models/conv_paths.py``).
* ``channels_last``: the UNet's convolution weights and the input in NHWC.
* ``compile``: regional ``torch.compile`` of the repeated blocks (``models/compile.py``), inductor backend, with
  ``cpu_conv_paths`` as training applies it (compare with the ``cpu_conv_paths`` row: what training runs without
  ``torch_compile``); the compile time (first two steps minus two steady steps) is printed apart.
* ``bf16_autocast``: float32 weights under bf16 autocast (what accelerate's mixed precision does by itself).
* ``bf16_weights``: frozen weights in bf16 under bf16 autocast, LoRA in float32 (what ``mixed_precision bf16`` does
  where the CPU computes bf16 natively).
* ``foreach`` / ``fused``: AdamW's multi-tensor / fused step (base uses the single-tensor loop).

Rounds alternate the options, so machine noise hits all; the figures are the min and median over rounds of each
run's median step, in this process's CPU seconds (other jobs on a shared machine barely move them); the compile
warm-up is in wall seconds (inductor compiles in worker processes). The ratio is option/base (below 1 is faster).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = ("base", "cpu_conv_paths", "channels_last", "compile", "bf16_autocast", "bf16_weights", "foreach", "fused")


def one_run(base_unet, option: str, size: int, batch: int, steps: int) -> tuple[float, float]:
    """(median steady step CPU seconds, warm-up wall seconds of the first two steps beyond two steady ones)."""
    import torch
    import torch.nn.functional as F

    from sd_scripts.models.compile import compile_repeated_blocks, use_channels_last
    from sd_scripts.models.conv_paths import use_cpu_conv_paths
    from sd_scripts.networks.lora import create_network

    torch.manual_seed(0)
    unet = copy.deepcopy(base_unet)
    unet.requires_grad_(False)
    unet.eval()
    weights = torch.bfloat16 if option == "bf16_weights" else torch.float32
    unet.to(dtype=weights)
    if option == "channels_last":
        use_channels_last(unet)
    if option in ("cpu_conv_paths", "compile"):
        use_cpu_conv_paths(unet)
    network = create_network(unet, None, network_dim=16, network_alpha=8, train_text_encoder=False)
    network.apply_to()
    if option == "compile":
        compile_repeated_blocks(unet, "inductor")
    params = [p for p in network.parameters() if p.requires_grad]
    opt_kwargs = {"foreach": option == "foreach"}
    if option == "fused":
        opt_kwargs = {"fused": True}
    opt = torch.optim.AdamW(params, lr=1e-4, **opt_kwargs)
    latents = torch.randn(batch, 4, size // 8, size // 8)
    if option == "channels_last":
        latents = latents.contiguous(memory_format=torch.channels_last)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (batch,))
    use_autocast = option in ("bf16_autocast", "bf16_weights")
    times, walls = [], []
    for _ in range(steps):
        start, wall = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            pred = unet(latents.to(weights), t, hidden.to(weights)).sample
        loss = F.mse_loss(pred.float(), latents.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
        walls.append(time.perf_counter() - wall)
    network.remove()
    steady, steady_wall = statistics.median(times[2:]), statistics.median(walls[2:])
    return steady, max(0.0, walls[0] + walls[1] - 2 * steady_wall)


def optimizer_step(kinds: list[str], rounds: int) -> None:
    """AdamW's step alone on each model's LoRA (dim 16, UNet only), single-tensor / foreach / fused, alternated."""
    import torch

    from train_step import build_model

    from sd_scripts.networks.lora import create_network

    variants = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for kind in kinds:
        network = create_network(build_model(kind).unet, None, network_dim=16, network_alpha=8, train_text_encoder=False)
        params = [p for p in network.parameters() if p.requires_grad]
        repeat = 200 if kind == "tiny" else 20
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, kwargs in variants.items():
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
                opt.step()
                start = time.process_time()
                for _ in range(repeat):
                    opt.step()
                times[name].append((time.process_time() - start) / repeat)
        single = statistics.median(times["single"])
        for name in variants:
            med = statistics.median(times[name])
            print(f"{kind} AdamW step over {len(params)} LoRA tensors, {name:8s} median {med * 1000:.2f} CPU ms, "
                  f"ratio {med / single:.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--optimizer_step", action="store_true", help="time AdamW's step alone")
    args = parser.parse_args()
    if args.optimizer_step:
        optimizer_step([args.only] if args.only else ["tiny", "sd15"], args.rounds)
        return 0
    from train_step import build_model

    from sd_scripts.training.speed import cpu_bf16_support

    print(f"bf16 on this CPU: {cpu_bf16_support()}")
    options = [o for o in args.options.split(",") if o]
    kinds = [args.only] if args.only else ["tiny", "sd15"]
    for kind in kinds:
        size = args.size or (64 if kind == "tiny" else 128)
        batch = args.batch or (4 if kind == "tiny" else 1)
        unet = build_model(kind).unet
        results: dict[str, list[float]] = {o: [] for o in options}
        warm: dict[str, list[float]] = {o: [] for o in options}
        for r in range(args.rounds):
            for option in (options if r % 2 == 0 else options[::-1]):
                steady, warmup = one_run(unet, option, size, batch, max(args.steps, 4))
                results[option].append(steady)
                warm[option].append(warmup)
        base = min(results["base"]) if "base" in results else None
        for option in options:
            lo, med = min(results[option]), statistics.median(results[option])
            ratio = f", ratio {lo / base:.3f}" if base else ""
            extra = f", warm-up (compile) {statistics.median(warm[option]):.1f} s" if option == "compile" else ""
            print(f"{kind} {size}px batch {batch} {option:14s} min {lo:.4f} CPU s/step, median {med:.4f}{ratio}{extra}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
