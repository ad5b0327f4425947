#!/usr/bin/env python
"""Benchmarks of the LoRA tools on full-size SD1.5-shaped random weights (not a test).

    python bench/tools.py                 # every stage, each in its own process (peak memory per stage)
    python bench/tools.py --stage resize  # one stage
    python bench/tools.py --quick         # one module of each shape (minutes -> seconds)
    python bench/tools.py --device cuda   # the math on the GPU
    python bench/tools.py --family flux   # FLUX.1 shapes: resize (rank 64 -> 16, sv_fro 0.9) and extract (rank 16)
                                          # on one block linear of each of FLUX.1's 8 shapes, timed one by one and
                                          # weighted by how many of each the transformer has (19 x 10 + 38 x 3)

Stages:

* ``resize``: a rank-128 LoCon (every SD1.5 LoRA/LoCon layer, conv layers included) resized to
  rank 32 and with ``sv_fro 0.9``: ours (factor-space SVD) against the full-matrix method of
  kohya's ``resize_lora.py`` (rebuild ``up @ down``, dense SVD), run side by side in the same
  process; the ratio of wall times, and the relative difference of the two outputs' deltas.
* ``extract``: LoCon extraction (rank 32 linear and conv) between two full-size SD1.5-shaped
  checkpoints (fp16, tuned = base + a low-rank change + noise on every target layer), with the
  randomized SVD's reported error against the exact truncation error on a few layers.
* ``merge``: the rank-128 LoCon merged into the full-size checkpoint.
* ``clamp``: extraction's ``clamp_quantile`` on the attention layers: the relative error of the rank-32
  approximation against the true change, clamping kohya's quantity (``U diag(S)`` and ``Vh``, what
  ``extract_network`` does) against clamping the evenly split factors (``sqrt(S)`` each side, what it did before).

Wall time is ``time.perf_counter``; peak memory is the process's peak RSS (``ru_maxrss``, each
stage runs in a fresh process) and, with CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ------------------------------------------------------------------------------------------ SD1.5 shapes


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """LDM checkpoint keys and shapes of SD1.5's UNet and text encoder (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models import ldm_convert

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    shapes = {}
    for name, key in ldm_convert.unet_ldm_key_map(unet).items():
        shapes[key] = tuple(unet.state_dict()[name].shape)
    te_sd = te.state_dict()
    for name, key in ldm_convert.text_encoder_ldm_key_map(te, "clip").items():
        shapes[key] = tuple(te_sd[name].shape)
    return shapes


def flux_shapes() -> dict[str, tuple[int, ...]]:
    """BFL keys and shapes of the full-size FLUX.1 dev transformer (meta device)."""
    from sd_scripts.models.flux.transformer import FluxTransformer
    from sd_scripts.testing.random_checkpoints import meta_state_shapes

    return meta_state_shapes(FluxTransformer)


def lora_layers(shapes, quick: bool):
    from sd_scripts.networks.checkpoint_map import checkpoint_lora_map
    from sd_scripts.networks.ldm_lora_map import lora_target_names

    _, lmap = checkpoint_lora_map(shapes)
    names = lora_target_names(lmap, conv=True, shapes=shapes)
    if quick:
        seen, kept = set(), []
        for name in names:
            shape = shapes[lmap[name].weight_key]
            if shape not in seen:
                seen.add(shape)
                kept.append(name)
        names = kept
    return lmap, names


def random_lora(shapes, lmap, names, rank: int, seed: int = 0):
    """Random LoCon factors, singular values decaying like a trained LoRA's."""
    import torch

    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.97 ** i for i in range(rank)])
    sd = {}
    for name in names:
        shape = shapes[lmap[name].weight_key]
        out, rest = shape[0], shape[1:]
        r = rank
        down = torch.randn(r, math.prod(rest), generator=g) / math.sqrt(math.prod(rest))
        up = torch.randn(out, r, generator=g) * 0.01 * decay[None, :r]
        sd[f"{name}.lora_down.weight"] = down.reshape((r,) + rest).half()
        sd[f"{name}.lora_up.weight"] = (up.reshape(out, r, 1, 1) if len(shape) == 4 else up).half()
        sd[f"{name}.alpha"] = torch.tensor(float(r) / 2)
    return sd


def random_checkpoint(shapes, seed: int = 0, dtype=None):
    import torch

    dtype = dtype or torch.float16
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=g)
        state[key] = t.to(dtype)
    return state


def _sync(device):
    import torch

    if device and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device) -> dict:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device and str(device).startswith("cuda"):
        import torch

        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ------------------------------------------------------------------------------------------ resize


def full_matrix_resize(modules, new_rank: int, method: str, param, device):
    """kohya ``resize_lora.py``'s method: rebuild ``up @ down`` in float32, dense SVD, truncate
    (rank chosen by the same rule as ours, so the outputs can be compared)."""
    import torch

    from sd_scripts.networks import lora_math as lm

    out = {}
    for name, mod in modules.items():
        m = mod.to(device) if device else mod
        u, d = m.updown(scaled=False)
        w = u @ d
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        k = lm.select_rank(S, method, param, min(new_rank, mod.rank))
        out[name] = ((U[:, :k] * S[:k]).cpu(), Vh[:k].cpu(), mod.scale)
    return out


def _delta_difference(ours_sd, modules, baseline) -> float:
    """Largest relative Frobenius difference between the two methods' deltas, computed in factor space."""
    import torch

    from sd_scripts.networks.network_state import parse_network

    ours = parse_network(ours_sd)
    worst = 0.0
    for name, (bu, bd, scale) in baseline.items():
        ou, od = ours[name].updown(scaled=True)
        ou, od = ou.double(), od.double()
        bu, bd = bu.double() * scale, bd.double()
        # ||A - B||^2 = ||A||^2 + ||B||^2 - 2 <A, B>, each from small Gram matrices
        aa = float(((ou.T @ ou) * (od @ od.T)).sum())
        bb = float(((bu.T @ bu) * (bd @ bd.T)).sum())
        ab = float(((ou.T @ bu) * (od @ bd.T)).sum())
        worst = max(worst, math.sqrt(max(aa + bb - 2 * ab, 0.0) / max(bb, 1e-30)))
    return worst


def stage_resize(args) -> dict:
    from sd_scripts.networks.network_state import parse_network
    from sd_scripts.networks.resize import resize_network

    shapes = sd15_shapes()
    lmap, names = lora_layers(shapes, args.quick)
    lora = random_lora(shapes, lmap, names, 128)
    modules = parse_network(lora)
    result = {"modules": len(modules), "rank": 128}
    for label, method, param in (("fixed 32", "fixed", None), ("sv_fro 0.9", "sv_fro", 0.9)):
        _sync(args.device)
        t0 = time.perf_counter()
        ours = resize_network(modules, 32 if method == "fixed" else 128, method=None if method == "fixed" else method,
                              param=param, device=args.device)
        _sync(args.device)
        t_ours = time.perf_counter() - t0
        peak_ours = _peak(args.device)  # before the baseline's dense matrices and LAPACK workspaces
        t0 = time.perf_counter()
        base = full_matrix_resize(modules, 32 if method == "fixed" else 128, method, param, args.device)
        _sync(args.device)
        t_full = time.perf_counter() - t0
        same_ranks = all(m.new_rank == base[m.name][1].shape[0] for m in ours.modules)
        result[label] = {
            "ours_s": round(t_ours, 3), "full_matrix_s": round(t_full, 3), "speedup": round(t_full / t_ours, 1),
            "same_ranks": same_ranks, "max_rel_delta_difference": _delta_difference(ours.state_dict, modules, base),
            "mean_rank": round(sum(m.new_rank for m in ours.modules) / len(ours.modules), 1),
            "peak_rss_gib_after_ours": round(peak_ours["peak_rss_gib"], 2),
        }
    result.update(_peak(args.device))
    return result


# ------------------------------------------------------------------------------------------ extract / merge


def _tuned_from(base, shapes, lmap, names, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for name in names:
        key = lmap[name].weight_key
        shape = shapes[key]
        out, n = shape[0], math.prod(shape[1:])
        r = 64
        change = (torch.randn(out, r, generator=g) * torch.tensor([0.9 ** i for i in range(r)])) @ torch.randn(r, n, generator=g)
        change = change * (0.002 / math.sqrt(r)) + torch.randn(out, n, generator=g) * 1e-4
        tuned[key] = (base[key].float() + change.reshape(shape)).to(base[key].dtype)
    return tuned


def stage_extract(args) -> dict:
    from sd_scripts.networks import lora_math as lm
    from sd_scripts.networks.extract import extract_network

    shapes = sd15_shapes()
    lmap, names = lora_layers(shapes, args.quick)
    base = random_checkpoint(shapes, 0)  # quick: only the chosen layers differ, the others are skipped as unchanged
    tuned = _tuned_from(base, shapes, lmap, names)
    _sync(args.device)
    t0 = time.perf_counter()
    res = extract_network(base, tuned, "fixed", 32, 32, device=args.device)
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    # randomized SVD error against the exact truncation error, on the largest layers
    checks = []
    for m in sorted(res.modules, key=lambda m: -math.prod(shapes[lmap[m.name].weight_key]))[:3]:
        key = lmap[m.name].weight_key
        w = (tuned[key].float() - base[key].float()).reshape(shapes[key][0], -1)
        exact = lm.retained_stats(lm.dense_svd(w, randomized=False), m.rank)["rel_error"]
        checks.append({"layer": m.name, "rank": m.rank, "reported_error": round(m.rel_error, 5),
                       "exact_truncation_error": round(exact, 5), "randomized": not m.exact})
    out = {"modules": len(res.modules), "wall_s": round(elapsed, 2),
           "randomized_modules": sum(1 for m in res.modules if not m.exact), "largest_layers": checks}
    out.update(_peak(args.device))
    return out


def stage_merge(args) -> dict:
    from sd_scripts.networks.lycoris_merge import NetworkInput, merge_into_checkpoint
    from sd_scripts.networks.network_state import parse_network

    shapes = sd15_shapes()
    lmap, names = lora_layers(shapes, args.quick)
    base = random_checkpoint(shapes, 0)
    lora = random_lora(shapes, lmap, names, 128)
    _sync(args.device)
    t0 = time.perf_counter()
    report = merge_into_checkpoint(base, [NetworkInput("lora", parse_network(lora), 0.8)], device=args.device)
    _sync(args.device)
    out = {"weights_changed": report.weights_changed, "wall_s": round(time.perf_counter() - t0, 2)}
    out.update(_peak(args.device))
    return out


# ------------------------------------------------------------------------------------------ FLUX.1


def _flux_layers():
    """(shapes of the chosen weights, lora map, one module name per shape, {name: how many the model has})."""
    shapes = flux_shapes()
    lmap, names = lora_layers(shapes, quick=True)
    _, every = lora_layers(shapes, quick=False)
    counts = {name: sum(1 for n in every if shapes[lmap[n].weight_key] == shapes[lmap[name].weight_key])
              for name in names}
    return shapes, lmap, names, counts


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def stage_flux_resize(args) -> dict:
    """A rank-64 FLUX.1 LoRA resized to 16 (and sv_fro 0.9), per module: ours (factor-space SVD) against the
    full-matrix SVD; the whole LoRA's time is the per-shape times weighted by the module counts."""
    from sd_scripts.networks.network_state import parse_network
    from sd_scripts.networks.resize import resize_network

    shapes, lmap, names, counts = _flux_layers()
    modules = parse_network(random_lora(shapes, lmap, names, 64))
    result = {"modules_in_a_full_lora": sum(counts.values()), "rank": 64, "per_shape": {}}
    for label, method, param in (("fixed 16", "fixed", None), ("sv_fro 0.9", "sv_fro", 0.9)):
        total_ours = total_full = 0.0
        worst = 0.0
        for name in names:
            one = {name: modules[name]}
            ours, t_ours = _timed(lambda: resize_network(one, 16 if method == "fixed" else 64,
                                                         method=None if method == "fixed" else method, param=param,
                                                         device=args.device), args.device)
            base, t_full = _timed(lambda: full_matrix_resize(one, 16 if method == "fixed" else 64, method, param,
                                                             args.device), args.device)
            worst = max(worst, _delta_difference(ours.state_dict, one, base))
            total_ours += t_ours * counts[name]
            total_full += t_full * counts[name]
            result["per_shape"].setdefault(label, {})[f"{shapes[lmap[name].weight_key]}"] = {
                "ours_s": round(t_ours, 4), "full_matrix_s": round(t_full, 3), "count": counts[name]}
        result[label] = {"full_lora_ours_s": round(total_ours, 2), "full_lora_full_matrix_s": round(total_full, 1),
                         "speedup": round(total_full / total_ours, 1), "max_rel_delta_difference": worst}
    result.update(_peak(args.device))
    return result


def stage_flux_extract(args) -> dict:
    """Rank-16 extraction between two FLUX.1 weights of each shape (randomized SVD), per module, weighted by the
    module counts; the reported error against the exact truncation error."""
    from sd_scripts.networks import lora_math as lm
    from sd_scripts.networks.extract import extract_network

    shapes, lmap, names, counts = _flux_layers()
    keys = {lmap[n].weight_key for n in names} | {"img_in.weight"}
    small = {k: shapes[k] for k in keys}
    base = random_checkpoint(small, 0, dtype=__import__("torch").bfloat16)
    tuned = _tuned_from(base, small, lmap, names)
    total, checks = 0.0, []
    for name in names:
        key = lmap[name].weight_key
        only = dict(base, **{key: tuned[key]})  # the other layers are equal: skipped as unchanged
        res, t = _timed(lambda: extract_network(base, only, "fixed", 16, device=args.device), args.device)
        total += t * counts[name]
        m = res.modules[0]
        w = (tuned[key].float() - base[key].float())
        exact = lm.retained_stats(lm.dense_svd(w, randomized=False), m.rank)["rel_error"]
        checks.append({"shape": str(shapes[key]), "count": counts[name], "s": round(t, 3),
                       "reported_error": round(m.rel_error, 4), "exact_truncation_error": round(exact, 4),
                       "randomized": not m.exact})
    out = {"full_transformer_s": round(total, 1), "per_shape": checks}
    out.update(_peak(args.device))
    return out


def _clamp_split_factors(res, k: int, q: float):
    """The clamp extraction used before: both evenly split factors to the q-quantile of their absolute values."""
    import torch

    from sd_scripts.networks import lora_math as lm

    up, down = lm.split_factors(res, k)
    hi = lm.quantile(torch.cat([up.reshape(-1), down.reshape(-1)]).abs(), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def stage_clamp(args) -> dict:
    from sd_scripts.networks import lora_math as lm

    shapes = sd15_shapes()
    lmap, names = lora_layers(shapes, True)
    names = [n for n in names if "attn" in n and "lora_unet" in n][:6]
    base = random_checkpoint(shapes, 0)
    tuned = _tuned_from(base, shapes, lmap, names)
    rows = []
    for q in (0.99, 0.999):
        for name in names:
            key = lmap[name].weight_key
            w = (tuned[key].float() - base[key].float()).reshape(shapes[key][0], -1)
            res = lm.dense_svd(w, randomized=False)
            errors = {}
            for label, factors in (("kohya_quantity", lm.clamped_factors(res, 32, q)),
                                   ("split_factors", _clamp_split_factors(res, 32, q))):
                up, down = factors
                errors[label] = round(float((w - up @ down).norm() / w.norm()), 4)
            rows.append({"quantile": q, "layer": name.replace("lora_unet_", ""), **errors,
                         "unclamped": round(lm.retained_stats(res, 32)["rel_error"], 4)})
    return {"rows": rows}


STAGES = {"resize": stage_resize, "extract": stage_extract, "merge": stage_merge, "clamp": stage_clamp}
FLUX_STAGES = {"flux_resize": stage_flux_resize, "flux_extract": stage_flux_extract}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="LoRA tool benchmarks on SD1.5- or FLUX.1-shaped weights")
    p.add_argument("--stage", choices=tuple(STAGES) + tuple(FLUX_STAGES), default=None,
                   help="run one stage in this process")
    p.add_argument("--family", choices=("sd15", "flux"), default="sd15", help="the model's shapes")
    p.add_argument("--quick", action="store_true", help="one layer of each shape")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.stage:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = (STAGES | FLUX_STAGES)[args.stage](args)
        result["stage"] = args.stage
        result["device"] = args.device or "cpu"
        result["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result))
        return 0
    for stage in FLUX_STAGES if args.family == "flux" else STAGES:
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage]
        if args.quick:
            cmd.append("--quick")
        if args.device:
            cmd += ["--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{stage}: failed\n{proc.stderr[-2000:]}")
            continue
        print(json.dumps(json.loads(lines[-1][len("RESULT "):]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
