#!/usr/bin/env python
"""Peak memory and time of loading a full-size single-file checkpoint (not a test).

    python bench/model_load.py                  # SDXL-shaped fp16 file (~6.9 GB, random weights)
    python bench/model_load.py --family sd15    # SD1.5-shaped fp16 file (~2.1 GB)
    python bench/model_load.py --keep           # keep the generated checkpoint in bench/.cache/
    python bench/model_load.py --family flux    # FLUX.1-shaped bf16 transformer: 1+2 and 2+4 full-width blocks,
                                                # extrapolated per block to 19+38 (a 23.8 GB file)

Builds a full-size checkpoint of the family with random fp16 weights (LDM/SGM keys as a real file has them), then
loads it in fresh processes, side by side:

* ``ours``: ``model_loading.load_model`` in float32 (what training on a CPU, or before the move to the GPU, holds);
* ``ours bf16``: ``load_model(..., dtype=bfloat16)``;
* ``bare``: ``safetensors.torch.load_file`` of the same file, nothing else (the floor: the file's tensors in memory).

FLUX.1: a full-size transformer is 23.8 GB in bf16, more than this benchmark's machine (24 GiB) can hold next to
the loader, so the file has every tensor of full width (hidden 3072, MLP 12288) and fewer blocks: 1 double + 2
single, then 2 + 4 (written tensor by tensor from meta-device shapes, so writing needs no RAM); each load's peak
is fitted as ``fixed + k x file bytes`` from the two sizes and extrapolated to the full file (19 + 38 blocks, its
bytes from the meta-device model). CLIP-L, T5 and the VAE are the tiny test ones. ``ours fp8`` loads with
``fp8_base`` (block linears stored in float8). After loading, every weight is read once: a weight the loader leaves
memory-mapped from the file counts in the peak RSS (file pages the kernel may drop and read again), not in the
anonymous memory.

Memory: the peak of the process's anonymous resident memory (``RssAnon``, sampled every 20 ms: the memory that must
fit in RAM), and the peak RSS (``ru_maxrss``), which also counts the memory-mapped file's pages (the kernel can drop
those under pressure and read them again). Ratios are to the parameter bytes of the loaded model in its dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _family_parts(family: str):
    """Meta-device UNet, VAE and text encoders of the full-size family, and the ``models_to_ldm`` kind."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_scripts.models.families import get_family

    fam = get_family("sdxl" if family == "sdxl" else "sd1")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(fam.diffusers_unet_config())
        vae = AutoencoderKL.from_config(fam.diffusers_vae_config())
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
        if family != "sdxl":
            return unet, vae, te1, "clip"
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
            projection_dim=1280, max_position_embeddings=77, vocab_size=49408))
    return unet, vae, [te1, te2], "sdxl"


def write_checkpoint(family: str, path: str) -> int:
    """A random fp16 single-file checkpoint of the family at ``path``; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from sd_scripts.models.ldm_convert import models_to_ldm

    unet, vae, tes, kind = _family_parts(family)
    meta = models_to_ldm(unet, vae, tes, kind)
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, value in meta.items():
        t = torch.empty(value.shape, dtype=torch.float16)
        t.normal_(0.0, 0.02, generator=g) if t.dim() else t.fill_(1.0)
        state[key] = t
    save_file(state, path)
    return os.path.getsize(path)


FLUX_SIZES = ((1, 2), (2, 4))


def flux_shapes(depth: int, single: int) -> dict:
    from sd_scripts.models.flux.transformer import FluxParams, FluxTransformer
    from sd_scripts.testing.random_checkpoints import meta_state_shapes

    return meta_state_shapes(lambda: FluxTransformer(FluxParams(depth=depth, depth_single_blocks=single)))


def write_flux(folder: str, depth: int, single: int) -> tuple[str, dict]:
    """A FLUX.1-shaped bf16 transformer of ``depth`` + ``single`` full-width blocks and tiny clip_l/t5xxl/ae files."""
    from sd_scripts.testing.random_checkpoints import write_random_checkpoint
    from sd_scripts.testing.tiny_flux import save_tiny_flux_files

    parts = os.path.join(folder, "parts")
    files = {k: str(v) for k, v in save_tiny_flux_files(parts).items()} if not os.path.isdir(parts) else {
        "clip_l": os.path.join(parts, "clip_l.safetensors"), "t5xxl": os.path.join(parts, "t5xxl.safetensors"),
        "ae": os.path.join(parts, "ae.safetensors"), "tokenizer_cache_dir": os.path.join(parts, "tokenizer_cache")}
    path = os.path.join(folder, f"flux-{depth}-{single}-random-bf16.safetensors")
    if not os.path.exists(path):
        write_random_checkpoint(path, flux_shapes(depth, single))
    return path, files


def _anon_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _measure(mode: str, path: str, family: str) -> dict:
    """Run in a child process: load the file one way, report time and peak memory."""
    import threading

    import torch

    peak_anon = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _anon_bytes())
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "bare":
        from safetensors.torch import load_file

        state = load_file(path)
        params = sum(t.numel() for t in state.values())
        element = 2
        for t in state.values():
            t.add_(0)  # touch every page, as a load that converts the weights does
    elif family == "flux":
        from sd_scripts.core.config import TrainConfig
        from sd_scripts.models.loading import load_model

        files = json.loads(os.environ["BENCH_FLUX_PARTS"])
        config = TrainConfig(pretrained_model_name_or_path=path, clip_l=files["clip_l"], t5xxl=files["t5xxl"],
                             ae=files["ae"], tokenizer_cache_dir=files["tokenizer_cache_dir"],
                             fp8_base=mode == "ours fp8", mixed_precision="bf16")
        model = load_model(config, dtype=torch.bfloat16)
        for p in model.unet.parameters():  # touch every weight (a memory-mapped one is read in now), as training does
            p.detach().reshape(-1).view(torch.uint8).sum()
        params = sum(p.numel() for p in model.unet.parameters())
        element = 2
        model_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    else:
        from sd_scripts.core.config import TrainConfig
        from sd_scripts.models.loading import load_model
        from sd_scripts.testing.tiny_models import TINY_PAD_TOKENS, TOKENIZER_CACHE_NAMES, write_tiny_tokenizer

        tok = os.path.join(os.path.dirname(path), "tokenizer_cache")
        for name in (("sdxl", "sdxl_2") if family == "sdxl" else ("sd1",)):
            write_tiny_tokenizer(os.path.join(tok, TOKENIZER_CACHE_NAMES[name]), TINY_PAD_TOKENS[name])
        dtype = torch.bfloat16 if mode == "ours bf16" else torch.float32
        model = load_model(TrainConfig(pretrained_model_name_or_path=path, tokenizer_cache_dir=tok,
                                       sdxl=family == "sdxl" or None), dtype=dtype)
        params = sum(p.numel() for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters())
        element = torch.finfo(dtype).bits // 8
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _anon_bytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds": seconds, "peak_rss": peak, "peak_anon": peak_anon[0],
            "model_bytes": params * element, "loaded_bytes": locals().get("model_bytes", params * element)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sdxl", "sd15", "flux"), default="sdxl")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint in bench/.cache/")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.family)))
        return 0

    folder = os.path.join(ROOT, "bench", ".cache") if args.keep else tempfile.mkdtemp(prefix="model_load_")
    os.makedirs(folder, exist_ok=True)
    if args.family == "flux":
        return _flux_main(folder, args.keep)
    path = os.path.join(folder, f"{args.family}-random-fp16.safetensors")
    if not os.path.exists(path):
        print(f"writing {path} ...", flush=True)
        write_checkpoint(args.family, path)
    size = os.path.getsize(path)
    print(f"{args.family} fp16 checkpoint: {size / 2**30:.2f} GiB")
    results = {}
    for mode in ("bare", "ours", "ours bf16"):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, __file__, "--family", args.family, "--child", mode, path],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{mode}: failed\n{proc.stderr[-2000:]}")
            continue
        results[mode] = r = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, r in results.items():
        print(f"{mode:10s} {r['seconds']:6.1f} s  peak anonymous {r['peak_anon'] / 2**30:6.2f} GiB "
              f"({r['peak_anon'] / r['model_bytes']:.2f}x the loaded model), peak RSS {r['peak_rss'] / 2**30:6.2f} GiB")
    if not args.keep:
        os.remove(path)
    return 0


def _child(family: str, mode: str, path: str, env_extra: dict | None = None) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, __file__, "--family", family, "--child", mode, path],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"{mode}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flux_main(folder: str, keep: bool) -> int:
    """Two reduced FLUX.1-shaped transformers, loaded three ways; peaks extrapolated to the full-size file."""
    import torch

    from sd_scripts.models.flux.transformer import FLUX_DEV_PARAMS

    full_bytes = sum(torch.Size(s).numel() * 2 for s in flux_shapes(FLUX_DEV_PARAMS.depth,
                                                                    FLUX_DEV_PARAMS.depth_single_blocks).values())
    measured: dict[str, list[tuple[int, dict]]] = {}
    for depth, single in FLUX_SIZES:
        print(f"writing a {depth} + {single} block FLUX.1-shaped transformer ...", flush=True)
        path, files = write_flux(folder, depth, single)
        size = os.path.getsize(path)
        print(f"  {size / 2**30:.2f} GiB")
        for mode in ("bare", "ours bf16", "ours fp8"):
            r = _child("flux", mode, path, {"BENCH_FLUX_PARTS": json.dumps(files)})
            if r is None:
                continue
            measured.setdefault(mode, []).append((size, r))
            print(f"  {mode:10s} {r['seconds']:6.1f} s  peak anonymous {r['peak_anon'] / 2**30:6.2f} GiB, "
                  f"loaded weights {r['loaded_bytes'] / 2**30:6.2f} GiB, peak RSS {r['peak_rss'] / 2**30:6.2f} GiB")
        if not keep:
            os.remove(path)
    print(f"extrapolated to FLUX.1's 19 + 38 blocks (a {full_bytes / 2**30:.2f} GiB bf16 file):")
    for mode, points in measured.items():
        if len(points) < 2:
            continue
        (x1, a), (x2, b) = points[:2]

        def fit(key):
            return a[key] + (b[key] - a[key]) / (x2 - x1) * (full_bytes - x1)

        print(f"  {mode:10s} peak anonymous {fit('peak_anon') / 2**30:6.2f} GiB for {fit('loaded_bytes') / 2**30:6.2f} "
              f"GiB of weights ({fit('peak_anon') / fit('loaded_bytes'):.2f}x), peak RSS {fit('peak_rss') / 2**30:6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
