#!/usr/bin/env python
"""Convolution paths on CPU, per shape and over a whole UNet step (not a test).

    python bench/conv_paths.py                         full-size SD1.5 UNet, 128 px, batch 1
    python bench/conv_paths.py --size 256 --batch 4
    python bench/conv_paths.py --kind sdxl --size 256  full-size SDXL UNet
    python bench/conv_paths.py --whole_only            only the whole-UNet comparison

For every distinct convolution the UNet runs at that size (its weights frozen, the input needing its gradient, as
in LoRA training), the CPU seconds of forward + backward on each path: PyTorch's own pick (``torch``), im2col +
GEMM (``thnn_conv2d``), oneDNN in channels_last, and the path ``cpu_conv_paths`` takes (``rule``,
``sd_scripts/models/conv_paths.py``); then the sums over the UNet's calls. Then the whole UNet's forward + backward
with and without ``cpu_conv_paths``, alternated, and the largest difference of their outputs and input gradients.
Times are this process's CPU seconds (min of the repeats), one thread.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_unet(kind: str):
    import torch
    from diffusers import UNet2DConditionModel

    from sd_scripts.models.families import get_family

    torch.manual_seed(0)
    family = get_family("sdxl" if kind == "sdxl" else "sd1")
    return UNet2DConditionModel(**family.diffusers_unet_config(False)).requires_grad_(False).eval()


def unet_inputs(unet, size: int, batch: int):
    import torch

    latents = torch.randn(batch, 4, size // 8, size // 8, requires_grad=True)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim)}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled),
                                       "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
    return latents, torch.full((batch,), 500), kwargs


def conv_calls(unet, inputs) -> list:
    """(module, input shape) of every Conv2d call of one forward."""
    import torch

    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, tuple(i[0].shape))))
             for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    latents, t, kwargs = inputs
    with torch.no_grad():
        unet(latents, t, **kwargs)
    for h in hooks:
        h.remove()
    return calls


def cpu_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def per_shape(calls, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from sd_scripts.models.conv_paths import _conv_forward_by_shape

    def runner(path, conv, x):
        weight, cl = conv.weight, torch.channels_last
        run = {
            "torch": lambda: F.conv2d(x, weight, conv.bias, conv.stride, conv.padding),
            "im2col": lambda: torch._C._nn.thnn_conv2d(x, weight, conv.kernel_size, conv.bias, conv.stride, conv.padding),
            "channels_last": lambda: F.conv2d(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl),
                                              conv.bias, conv.stride, conv.padding).contiguous(),
            "rule": lambda: _conv_forward_by_shape(conv, x, weight, conv.bias),
        }[path]
        return lambda: run().sum().backward()

    paths = ("torch", "im2col", "channels_last", "rule")
    seen: dict = {}
    totals: collections.Counter = collections.Counter()
    print(f"{'convolution':44s} " + " ".join(f"{p:>13s}" for p in paths) + "   (ms, forward + input gradient)")
    for conv, shape in calls:
        key = (tuple(conv.weight.shape), conv.stride, shape)
        if key not in seen:
            x = torch.randn(shape, requires_grad=True)
            seen[key] = {p: cpu_seconds(runner(p, conv, x), repeats) for p in paths}
            name = f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]} in {list(shape)}"
            print(f"{name:44s} " + " ".join(f"{seen[key][p] * 1e3:13.1f}" for p in paths), flush=True)
        for p in paths:
            totals[p] += seen[key][p]
    print(f"{'sum over the ' + str(len(calls)) + ' calls (s)':44s} " + " ".join(f"{totals[p]:13.3f}" for p in paths))


def whole(unet, inputs, repeats: int) -> None:
    from sd_scripts.models.conv_paths import remove_cpu_conv_paths, use_cpu_conv_paths

    latents, t, kwargs = inputs
    results = {}

    def step():
        latents.grad = None
        out = unet(latents, t, **kwargs).sample
        out.square().mean().backward()
        return out.detach().clone(), latents.grad.clone()

    times: dict[str, list[float]] = {"torch": [], "rule": []}
    for _ in range(repeats):
        for name in ("torch", "rule"):
            (use_cpu_conv_paths if name == "rule" else remove_cpu_conv_paths)(unet)
            results[name] = step()  # warm (oneDNN primitives) and keep the values
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    remove_cpu_conv_paths(unet)
    a, b = min(times["torch"]), min(times["rule"])
    out_diff = (results["torch"][0] - results["rule"][0]).abs().max().item()
    grad_diff = (results["torch"][1] - results["rule"][1]).abs().max().item()
    print(f"whole UNet forward + backward: torch {a:.3f} CPU s, cpu_conv_paths {b:.3f} CPU s, ratio {b / a:.3f} "
          f"(min of {repeats}); largest difference: output {out_diff:.2e}, input gradient {grad_diff:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole_only", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    unet = build_unet(args.kind)
    inputs = unet_inputs(unet, args.size, args.batch)
    print(f"{args.kind} UNet, {args.size} px, batch {args.batch}, torch {torch.__version__}, one thread")
    if not args.whole_only:
        per_shape(conv_calls(unet, inputs), args.repeats)
    whole(unet, inputs, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
