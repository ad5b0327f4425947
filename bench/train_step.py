"""Seconds per training step: our training loop against a bare loop, measured side by side.

    python bench/train_step.py                 tiny model (64 px) and full-size SD1.5-shaped UNet (128 px), CPU
    python bench/train_step.py --only tiny     just the tiny model
    python bench/train_step.py --only sdxl     full-size SDXL-shaped UNet at 256 px, CPU (needs ~20 GB of RAM)
    python bench/train_step.py --gpu           on CUDA: SD1.5-shaped at 512 px, batch 1/4/8, and SDXL-shaped at
                                               1024 px, batch 1/4, with and without gradient checkpointing:
                                               images/s, peak VRAM, share of the GPU's bf16 peak
    python bench/train_step.py --only flux     FLUX.1: the tiny model, and full-width blocks (1 double + 1 single)
                                               at 256 px in bf16 (bench/flux_step.py)
    python bench/train_step.py --gpu --only flux   full-size FLUX.1 at 512/1024 px, fp8_base, blocks_to_swap 0/8/16

"ours" is ``sd_scripts.training.loop.train`` (dataset with cached latents, noise, timesteps,
text conditioning, loss, clipping, optimizer and scheduler, progress callbacks). "bare" is the
same UNet with the same LoRA doing forward, backward and an AdamW step on one cached batch and
nothing else. Both use random weights (nothing is downloaded), the same batch size, UNet-only
LoRA (the text encoder is frozen; ours caches its outputs, ``cache_text_encoder_outputs``, as the bare
loop's conditioning is a fixed tensor), and run in this process. On CPU they alternate step by step: a bare step
runs inside our loop's progress callback after each of our steps and is left out of our step's time, so a busy
moment of the shared machine hits both alike (SDXL, whose second UNet would not fit in RAM: bare first, then ours).
The ratio ours/bare is the figure to watch (goal: <= 1.05).
On CPU the step times are this process's CPU seconds (``time.process_time``): both loops run single-threaded in
this process, and CPU time is barely moved by other processes on a shared machine, where wall time is not. On GPU
they are wall seconds after a device synchronize.
Peak memory is the process's peak RSS on CPU, or the CUDA allocator's peak on GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_FLOP_PER_IMAGE_512 = 1.73e12  # one SD1.5 training step at 512 px, per image (forward + backward)
SDXL_FLOP_PER_IMAGE_1024 = 14.3e12  # one SDXL training step at 1024 px, per image
CLOCK = {"cpu": time.process_time, "cuda": time.perf_counter}  # what a step's time is on each device

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def build_model(kind: str):
    """A LoadedModel with random weights: 'tiny' (test-sized) or 'sd15' (full-size SD1.5 shapes)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models.families import get_family
    from sd_scripts.models.loading import LoadedModel
    from sd_scripts.testing.tiny_models import build_tiny_components

    if kind == "sdxl":
        return _build_sdxl()
    family = get_family("sd1")
    torch.manual_seed(0)
    if kind == "tiny":
        parts = build_tiny_components("sd1", seed=0)
        return LoadedModel(family, parts["unet"], parts["vae"], [parts["text_encoder"]], [parts["tokenizer"]], False, "tiny")
    tiny = build_tiny_components("sd1", seed=0)  # only its tokenizer is used; ids stay below CLIP-L's vocab
    unet = UNet2DConditionModel(**family.diffusers_unet_config(False))
    vae = AutoencoderKL(**family.diffusers_vae_config(False))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=tiny["tokenizer"].bos_token_id, eos_token_id=tiny["tokenizer"].eos_token_id,
                                      pad_token_id=tiny["tokenizer"].pad_token_id))
    return LoadedModel(family, unet, vae, [te], [tiny["tokenizer"]], False, "sd15-random")


def _build_sdxl():
    """Full-size SDXL-shaped UNet and VAE; text encoders of the right widths but one layer each (their
    outputs are cached before training, so their depth does not change the step time)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_scripts.models.families import get_family
    from sd_scripts.models.loading import LoadedModel
    from sd_scripts.testing.tiny_models import build_tiny_components

    family = get_family("sdxl")
    torch.manual_seed(0)
    tiny = build_tiny_components("sdxl", seed=0)
    tok1, tok2 = tiny["tokenizer"], tiny["tokenizer_2"]
    common = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=1, bos_token_id=tok1.bos_token_id,
                  eos_token_id=tok1.eos_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                       hidden_act="quick_gelu", pad_token_id=tok1.pad_token_id, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     hidden_act="gelu", projection_dim=1280, pad_token_id=tok2.pad_token_id,
                                                     **common))
    unet = UNet2DConditionModel(**family.diffusers_unet_config(False))
    vae = AutoencoderKL(**family.diffusers_vae_config(False))
    return LoadedModel(family, unet, vae, [te1, te2], [tok1, tok2], False, "sdxl-random")


def make_images(folder: Path, size: int, count: int) -> Path:
    from tests.helpers import make_dataset

    return make_dataset(folder, folder="1_bench", count=count, size=(size, size))


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer:
    """Callbacks that record the clock (``CLOCK``: CPU time on CPU, wall time on CUDA) at every optimizer step."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def on_progress(self, step, total, loss, lr, epoch):
        self.times.append(self.clock())


def _bench_config(base, data: Path, out: Path, size: int, batch: int, steps: int, mixed_precision: str = "no",
                  gradient_checkpointing: bool = False):
    from sd_scripts.core.config import TrainConfig

    sdxl = base.family.name == "sdxl"
    return TrainConfig(
        pretrained_model_name_or_path=base.model_path, train_data_dir=str(data), output_dir=str(out), output_name="bench",
        resolution=str(size), min_bucket_reso=size, max_bucket_reso=size, train_batch_size=batch, max_train_steps=steps,
        network_dim=16, network_alpha=8, network_train_unet_only=True, cache_latents=True, optimizer_type="AdamW",
        seed=1, mixed_precision=mixed_precision, max_grad_norm=1.0, gradient_checkpointing=gradient_checkpointing,
        bucket_reso_steps=32 if sdxl else 64, cache_text_encoder_outputs=True, no_half_vae=sdxl,
    )


def _train_ours(base, config, callbacks, copy_unet: bool = True) -> None:
    """Our training loop on ``base`` (on a copy of its UNet unless ``copy_unet`` is off)."""
    from sd_scripts.training.loop import train

    model = copy.copy(base)
    if copy_unet:
        model.unet = copy.deepcopy(base.unet)
    train(config, callbacks, model=model)


def time_ours(base, data: Path, out: Path, size: int, batch: int, steps: int, mixed_precision: str = "no",
              copy_unet: bool = True, gradient_checkpointing: bool = False) -> float:
    import torch

    config = _bench_config(base, data, out, size, batch, steps, mixed_precision, gradient_checkpointing)
    timer = StepTimer(CLOCK["cuda" if torch.cuda.is_available() else "cpu"])  # the device the loop trains on
    _train_ours(base, config, timer, copy_unet)
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:])][1:]  # drop the first (warm-up) step
    return statistics.median(gaps)


def bare_step(base, size: int, batch: int, device, dtype, copy_unet: bool = True, gradient_checkpointing: bool = False):
    """``(step, done)``: ``step()`` runs one bare training step (forward, backward, AdamW step), ``done()`` takes the
    LoRA out of the UNet."""
    import torch
    import torch.nn.functional as F

    from sd_scripts.networks.lora import create_network
    from sd_scripts.training.speed import optimizer_speed_kwargs

    unet = (copy.deepcopy(base.unet) if copy_unet else base.unet).to(device, dtype=dtype)
    unet.requires_grad_(False)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    else:
        unet.eval()  # as the training loop runs it without gradient checkpointing
    network = create_network(unet, None, network_dim=16, network_alpha=8, train_text_encoder=False)
    network.apply_to()
    network.to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    # the optimizer step training takes (fused where torch has it), so that the ratio is the loop's own cost
    opt = torch.optim.AdamW(params, lr=1e-4, **optimizer_speed_kwargs(torch.optim.AdamW, device.type, {}))
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    extra = {}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + size conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                      "time_ids": time_ids}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def step() -> None:
        with autocast:
            pred = unet(latents, t, hidden, **extra).sample
        loss = F.mse_loss(pred.float(), latents.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, network.remove


def time_bare(base, size: int, batch: int, steps: int, device, dtype, copy_unet: bool = True,
              gradient_checkpointing: bool = False) -> float:
    import torch

    step, done = bare_step(base, size, batch, device, dtype, copy_unet, gradient_checkpointing)
    times = []
    clock = CLOCK[device.type]
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    done()
    return statistics.median(times[1:])


class InterleavedTimer:
    """Callbacks for our loop that run one bare step after each of our steps, so that the two alternate step by
    step and a busy moment of a shared machine hits both alike. Our step's time leaves the bare step out."""

    def __init__(self, bare, clock=time.process_time):
        self.bare, self.clock = bare, clock
        self.ours: list[float] = []
        self.bare_times: list[float] = []
        self._resumed = None

    def on_progress(self, step, total, loss, lr, epoch):
        now = self.clock()
        if self._resumed is not None:
            self.ours.append(now - self._resumed)
        start = self.clock()
        self.bare()
        end = self.clock()
        self.bare_times.append(end - start)
        self._resumed = end


def time_interleaved(base, data: Path, out: Path, size: int, batch: int, steps: int) -> tuple[list, list]:
    """Our loop and the bare step alternating step by step on CPU: (our step times, bare step times), warm-up left
    out."""
    import torch

    step, done = bare_step(base, size, batch, torch.device("cpu"), torch.float32)
    timer = InterleavedTimer(step)
    _train_ours(base, _bench_config(base, data, out, size, batch, steps), timer)
    done()
    return timer.ours[1:], timer.bare_times[2:]


def compare(kind: str, size: int, batch: int, steps: int, rounds: int) -> None:
    """Ours against bare on CPU. Where two UNets fit in RAM the two alternate step by step inside one run of our
    loop (:class:`InterleavedTimer`), ``rounds`` times; SDXL runs bare first, then ours on the same UNet."""
    import torch

    device = torch.device("cpu")
    base = build_model(kind)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", size, count=max(4, batch * 2))
        if kind == "sdxl":  # a second SDXL UNet would not fit in RAM
            bare = [time_bare(base, size, batch, steps, device, torch.float32, copy_unet=False)]
            ours = [time_ours(base, data, Path(tmp) / "out", size, batch, steps, copy_unet=False)]
        else:
            ours, bare = [], []
            for r in range(rounds):
                o, b = time_interleaved(base, data, Path(tmp) / f"out{r}", size, batch, steps)
                ours += o
                bare += b
        o, b = statistics.median(ours), statistics.median(bare)
        paired = statistics.median(x / y for x, y in zip(ours, bare))
        print(f"{kind:5s} {size:4d}px batch {batch}: ours {o:.4f} CPU s/step, bare {b:.4f} CPU s/step, "
              f"ratio {o / b:.3f} (median of the paired steps' ratios {paired:.3f}), "
              f"peak RSS {peak_memory_mb(device):.0f} MiB  (medians of {len(ours)} steps of ours, {len(bare)} bare)")


def gpu(batches: list[int], steps: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print("--gpu: no CUDA device here")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    base = build_model("sd15")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", 512, count=16)
        for batch in batches:
            _gpu_case(name, peak, "sd15", base, data, Path(tmp), 512, batch, steps, False, SD15_FLOP_PER_IMAGE_512)
    del base
    torch.cuda.empty_cache()
    base = build_model("sdxl")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", 1024, count=8)
        for batch in (1, 4):
            for ckpt in (False, True):
                _gpu_case(name, peak, "sdxl", base, data, Path(tmp), 1024, batch, steps, ckpt, SDXL_FLOP_PER_IMAGE_1024)


def _gpu_case(name, peak, kind, base, data, tmp, size, batch, steps, ckpt, flop_per_image) -> None:
    import torch

    device = torch.device("cuda")
    try:
        torch.cuda.reset_peak_memory_stats()
        ours = time_ours(base, data, tmp / f"out{kind}{batch}{ckpt}", size, batch, steps, mixed_precision="bf16",
                         gradient_checkpointing=ckpt)
        mem = peak_memory_mb(device)
        torch.cuda.reset_peak_memory_stats()
        bare = time_bare(base, size, batch, steps, device, torch.bfloat16, gradient_checkpointing=ckpt)
    except torch.cuda.OutOfMemoryError:
        print(f"{name} {kind} {size}px batch {batch} checkpointing {ckpt}: out of memory")
        torch.cuda.empty_cache()
        return
    ips = batch / ours
    share = f", {ips * flop_per_image / peak * 100:.1f}% of bf16 peak" if peak else ""
    print(f"{name} {kind} {size}px batch {batch} checkpointing {ckpt}: ours {ours:.3f} s/step ({ips:.2f} img/s{share}), "
          f"bare {bare:.3f} s/step, ratio {ours / bare:.3f}, peak VRAM {mem:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "sd15", "sdxl", "flux"], help="run one case")
    parser.add_argument("--gpu", action="store_true", help="GPU benchmark at 512 px (needs CUDA)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.gpu:
        if args.only == "flux":
            from bench.flux_step import gpu_flux

            gpu_flux(max(args.steps, 6), make_images, peak_memory_mb, BF16_PEAK)
            return 0
        gpu([1, 4, 8], max(args.steps, 8))
        return 0
    if args.only == "flux":
        from bench.flux_step import compare_cpu

        compare_cpu("tiny", 64, 2, max(args.steps, 8), args.rounds, make_images, peak_memory_mb)
        compare_cpu("blocks", 256, 1, args.steps, args.rounds, make_images, peak_memory_mb)
        return 0
    if args.only in (None, "tiny"):
        for batch in (1, 4):  # a tiny step moves by 20% from one moment to the next here: many steps
            compare("tiny", 64, batch, max(args.steps, 100), max(args.rounds, 2))
    if args.only in (None, "sd15"):
        compare("sd15", 128, 2, args.steps, args.rounds)
    if args.only == "sdxl":
        compare("sdxl", 256, 2, args.steps, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
