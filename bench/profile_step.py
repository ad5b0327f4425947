#!/usr/bin/env python
"""Where one training step's time goes: torch.profiler over a few steady steps of our loop (not a test).

    python bench/profile_step.py                      tiny model, 64 px, batch 4
    python bench/profile_step.py --kind sd15 --size 128 --batch 1
    python bench/profile_step.py --python             also cProfile: our Python functions by own time

Prints the operators by self CPU time, and the share of the profiled wall time spent outside the UNet's
forward and backward (our loop: data, noise, loss, clipping, optimizer, scheduler, callbacks).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Profiled:
    """Starts the profiler after ``start`` steps and stops it ``count`` steps later."""

    def __init__(self, start: int, count: int, python: bool):
        import torch

        self.start, self.count = start, count
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
        self.py = cProfile.Profile() if python else None

    def on_progress(self, step, total, loss, lr, epoch):
        if step == self.start:
            self.prof.__enter__()
            if self.py:
                self.py.enable()
        elif step == self.start + self.count:
            if self.py:
                self.py.disable()
            self.prof.__exit__(None, None, None)


def extra_settings(text: str) -> dict:
    """``name=value,name=value`` -> settings (values as Python literals where they parse, else strings)."""
    import ast

    settings = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            settings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[name] = value
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps profiled (after 3 warm-up steps)")
    parser.add_argument("--python", action="store_true")
    parser.add_argument("--train_te", action="store_true", help="train the text encoder's LoRA too (UNet + TE)")
    parser.add_argument("--extra", default="", help="more TrainConfig settings, as name=value,name=value")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    from train_step import build_model, make_images

    from sd_scripts.core.config import TrainConfig
    from sd_scripts.training.loop import train

    model = build_model(args.kind)
    prof = Profiled(3, args.steps, args.python)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", args.size, count=max(4, args.batch * 2))
        config = TrainConfig(
            pretrained_model_name_or_path=model.model_path, train_data_dir=str(data), output_dir=str(Path(tmp) / "out"),
            output_name="profile", resolution=str(args.size), min_bucket_reso=args.size, max_bucket_reso=args.size,
            train_batch_size=args.batch, max_train_steps=3 + args.steps + 1, network_dim=16, network_alpha=8,
            network_train_unet_only=not args.train_te, cache_latents=True, optimizer_type="AdamW", seed=1,
            max_grad_norm=1.0, **extra_settings(args.extra))
        train(config, prof, model=model)
    events = prof.prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profiled self CPU time {total / 1e6:.3f} s over {args.steps} steps")
    if prof.py:
        out = io.StringIO()
        stats = pstats.Stats(prof.py, stream=out).sort_stats("cumulative")
        stats.print_stats(r"sd_scripts|accelerate|torch/optim|torch/utils/data|diffusers/models/unets", args.rows)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
