#!/usr/bin/env python
"""Our trainer against kohya's sd-scripts on this machine, side by side (not a test).

    python bench/vs_kohya.py --kohya DIR --kohya_python PY            the training rows, 2 trials each
    python bench/vs_kohya.py --kohya DIR --kohya_python PY --rows 128,128u --steps 8 --trials 2
    python bench/vs_kohya.py --kohya DIR --kohya_python PY --ours_args "--torch_compile"   one of our options on
    python bench/vs_kohya.py --kohya DIR --kohya_python PY --tools    the LoRA tools kohya also has

It builds once (kept under ``--cache``, default ``bench/.vs_kohya``) a full-size SD1.5-shaped single-file
checkpoint with random weights (fp16, 1.07 B parameters), an offline CLIP tokenizer folder in kohya's
``tokenizer_cache_dir`` layout, and small datasets of square images with ``.txt`` captions. Then, for each row, it
runs our kohya command line (``python -m sd_scripts.train_network``) and kohya's ``train_network.py`` with the same
arguments, in turn (ours, kohya, ours, kohya, ...), each as a whole process through ``bench/step_clock.py``, which
records when each optimizer step ends (both draw a tqdm bar named "steps").

Per row and tool: median and min seconds per step over the steady steps (all trials' steps after the first
``--warmup`` of each run), time from launch to the first step, total wall time, peak RSS of the process (and
the peak before the first step: loading and caching), the median CPU seconds per step (the process's user + system
time between steps: on a shared machine the figure least changed by other processes' load, since waiting for a core
costs wall time but no CPU time), and the ratios ours/kohya. The machine may be shared: interleaving spreads the
noise over both tools, and the minimum is the wall figure least touched by it; say so with the numbers.

kohya is not part of this project: make a checkout with its own environment (it needs torchvision, which must
never enter ours). See ``README.md`` (Benchmarks) for the steps; without ``--kohya`` this script prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK = ROOT / "bench" / "step_clock.py"
HOW_TO_GET_KOHYA = (
    "--kohya DIR --kohya_python PY are needed: git clone https://github.com/kohya-ss/sd-scripts DIR && "
    "python3.11 -m venv DIR-venv && DIR-venv/bin/pip install torch==<ours> torchvision==<its match> && "
    "DIR-venv/bin/pip install -c <(echo torch==<ours>) -r DIR/requirements.txt (README: Against kohya's sd-scripts)")


@dataclass(frozen=True)
class Row:
    key: str
    size: int
    batch: int
    precision: str  # kohya's mixed_precision: no | bf16
    unet_only: bool

    @property
    def title(self) -> str:
        part = "UNet only" if self.unet_only else "UNet+TE"
        prec = "fp32" if self.precision == "no" else self.precision
        return f"{self.size}px {part} batch {self.batch} {prec}"


ROWS = {r.key: r for r in (
    Row("128", 128, 1, "no", False),
    Row("128u", 128, 1, "no", True),
    Row("256", 256, 1, "no", False),
    Row("128b4", 128, 4, "no", False),
    Row("128bf16", 128, 1, "bf16", False),
    Row("256b2", 256, 2, "no", True),
    Row("256b2bf16", 256, 2, "bf16", True),
)}
DEFAULT_ROWS = "128,128u,256,128b4,128bf16"


@dataclass
class Run:
    """One process: when its steps ended, how long it took, how much memory it held."""

    ok: bool
    wall: float
    first_step: float | None
    gaps: list[float] = field(default_factory=list)
    cpu_gaps: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    rss_before_steps_mb: float | None = None
    log: str = ""


# ------------------------------------------------------------------------------------------------- assets


def ensure_assets(cache: Path, sizes: set[int], images: int) -> dict:
    """The checkpoint, tokenizer folder and datasets (built once, reused)."""
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / "sd15_random_fp16.safetensors"
    tokenizers = cache / "tokenizers"
    if not ckpt.is_file():
        print(f"building {ckpt} (full-size SD1.5 shapes, random weights; once)", flush=True)
        # in a child process: a child forked from this one later would inherit its memory high-water mark
        # (ru_maxrss), and every run's peak RSS would read as this build's
        subprocess.run([sys.executable, __file__, "--build_checkpoint", str(ckpt)], check=True)
    tok = tokenizers / "openai_clip-vit-large-patch14"
    if not (tok / "merges.txt").is_file():
        from sd_scripts.testing.tiny_models import write_tiny_tokenizer

        write_tiny_tokenizer(tok)
    data = {size: _ensure_dataset(cache / f"data_{size}_{images}", size, images) for size in sizes}
    return {"ckpt": ckpt, "tokenizers": tokenizers, "data": data}


def _write_checkpoint(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models.families import get_family
    from sd_scripts.models.ldm_convert import models_to_ldm

    family = get_family("sd1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**family.diffusers_unet_config(False))
    vae = AutoencoderKL(**family.diffusers_vae_config(False))
    # CLIP-L's shapes; the tokenizer is the tiny one (ids < 49408), its ends are 639 and 640
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=639, eos_token_id=640, pad_token_id=640, projection_dim=768))
    state = {k: v.to(torch.float16).contiguous() for k, v in models_to_ldm(unet, vae, te, "clip").items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _ensure_dataset(folder: Path, size: int, count: int) -> Path:
    sub = folder / "1_bench"
    if sub.is_dir() and len(list(sub.glob("*.png"))) == count:
        return folder
    import numpy as np
    from PIL import Image

    sub.mkdir(parents=True, exist_ok=True)
    words = ["red", "green", "blue", "white", "black", "tree", "house", "sky"]
    rng = np.random.default_rng(0)
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        rgb = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y) + 2 * i)], -1)
        pixels = ((rgb * 0.4 + 0.5 + rng.normal(0, 0.05, rgb.shape)).clip(0, 1) * 255).astype("uint8")
        Image.fromarray(pixels).save(sub / f"img{i:02d}.png")
        (sub / f"img{i:02d}.txt").write_text(f"a photo of sks person, {words[i % len(words)]}", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------- running


def train_args(row: Row, assets: dict, out: Path, steps: int) -> list[str]:
    """The same kohya command line for both tools. Buckets are on with one bucket (the images' size), so neither
    tool's default bucket range matters."""
    args = [
        "--pretrained_model_name_or_path", str(assets["ckpt"]), "--tokenizer_cache_dir", str(assets["tokenizers"]),
        "--train_data_dir", str(assets["data"][row.size]), "--caption_extension", ".txt",
        "--output_dir", str(out), "--output_name", "bench", "--save_model_as", "safetensors",
        "--resolution", str(row.size), "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", str(row.size),
        "--train_batch_size", str(row.batch), "--max_train_steps", str(steps), "--seed", "1",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--cache_latents", "--sdpa",
        "--mixed_precision", row.precision, "--max_data_loader_n_workers", "0",
    ]
    if row.unet_only:
        args.append("--network_train_unet_only")
    return args


def run_one(tool: str, python: str, cwd: Path, args: list[str], log: Path, warmup: int, env: dict) -> Run:
    clock = log.with_suffix(".steps.json")
    clock.unlink(missing_ok=True)
    target = ["-m", "sd_scripts.train_network"] if tool == "ours" else [str(cwd / "train_network.py")]
    cmd = [python, str(CLOCK), str(clock), *target, *args]
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    if proc.returncode != 0 or not clock.is_file():
        return Run(False, wall, None, peak_rss_mb=usage.ru_maxrss / 1024, log=tail)
    record = json.loads(clock.read_text(encoding="utf-8"))
    steps = record["steps"]
    gaps = [b - a for a, b in zip(steps, steps[1:])][warmup:]
    cpu = record.get("cpu") or []
    cpu_gaps = [b - a for a, b in zip(cpu, cpu[1:])][warmup:]
    return Run(bool(steps), wall, (steps[0] - start) if steps else None, gaps, cpu_gaps, usage.ru_maxrss / 1024,
               record.get("rss_before_steps_mb"), tail)


def compare_row(row: Row, assets: dict, opts, env: dict) -> dict:
    runs: dict[str, list[Run]] = {"ours": [], "kohya": []}
    tools = {"ours": (sys.executable, ROOT), "kohya": (opts.kohya_python, Path(opts.kohya))}
    logs = Path(opts.cache) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for trial in range(opts.trials):
        order = ("ours", "kohya") if trial % 2 == 0 else ("kohya", "ours")  # neither always runs first
        for tool in order:
            python, cwd = tools[tool]
            out = Path(opts.cache) / "out" / f"{tool}_{row.key}_{trial}"
            args = train_args(row, assets, out, opts.steps)
            if tool == "ours":
                args += shlex.split(opts.ours_args)
            run = run_one(tool, python, cwd, args, logs / f"{tool}_{row.key}_{trial}.log", opts.warmup, env)
            runs[tool].append(run)
            status = (f"{statistics.median(run.gaps):.3f} s/step, {statistics.median(run.cpu_gaps):.3f} CPU s/step"
                      if run.gaps and run.cpu_gaps else "FAILED")
            print(f"  {row.title}: {tool} trial {trial + 1}: {status}, wall {run.wall:.1f} s", flush=True)
            if not run.ok:
                print("    " + run.log.strip().splitlines()[-1] if run.log.strip() else "    (no output)", flush=True)
    return {tool: _summary(rs) for tool, rs in runs.items()}


def _summary(runs: list[Run]) -> dict:
    good = [r for r in runs if r.ok and r.gaps]
    if not good:
        return {"ok": False}
    gaps = [g for r in good for g in r.gaps]
    return {
        "ok": True, "trials": len(good), "steps": len(gaps),
        "median_s": statistics.median(gaps), "min_s": min(gaps),
        "cpu_median_s": statistics.median(g for r in good for g in r.cpu_gaps),
        "first_step_s": statistics.median(r.first_step for r in good),
        "wall_s": statistics.median(r.wall for r in good),
        "peak_rss_gb": max(r.peak_rss_mb for r in good) / 1024,
        "rss_before_steps_gb": max((r.rss_before_steps_mb or 0) for r in good) / 1024,
    }


def print_table(results: list[tuple[Row, dict]]) -> None:
    head = (f"{'row':34s} {'tool':6s} {'median s/step':>13s} {'min':>7s} {'CPU s/step':>10s} {'1st step s':>10s} "
            f"{'wall s':>7s} {'RSS GB':>7s} {'(load+cache)':>12s}")
    print(head)
    print("-" * len(head))
    for row, res in results:
        for tool in ("ours", "kohya"):
            s = res[tool]
            if not s.get("ok"):
                print(f"{row.title:34s} {tool:6s} failed")
                continue
            print(f"{row.title:34s} {tool:6s} {s['median_s']:13.3f} {s['min_s']:7.3f} {s['cpu_median_s']:10.3f} "
                  f"{s['first_step_s']:10.1f} "
                  f"{s['wall_s']:7.1f} {s['peak_rss_gb']:7.2f} {s['rss_before_steps_gb']:12.2f}")
        o, k = res["ours"], res["kohya"]
        if o.get("ok") and k.get("ok"):
            print(f"{'':34s} {'ratio':6s} {o['median_s'] / k['median_s']:13.3f} {o['min_s'] / k['min_s']:7.3f} "
                  f"{o['cpu_median_s'] / k['cpu_median_s']:10.3f} {o['first_step_s'] / k['first_step_s']:10.2f} {o['wall_s'] / k['wall_s']:7.2f} "
                  f"{o['peak_rss_gb'] / k['peak_rss_gb']:7.2f}")


# ------------------------------------------------------------------------------------------------- tools


TOOL_CASES = {
    # name: (our command, kohya's command); {lora} is a rank-16 LoRA trained by a row, {ckpt} the checkpoint
    "resize 16->8": (["scripts/lora_resize.py", "--model", "{lora}", "--save_to", "{out}/ours_resized.safetensors",
                      "--new_rank", "8", "--save_precision", "fp16", "--device", "cpu", "--overwrite"],
                     ["networks/resize_lora.py", "--model", "{lora}", "--save_to", "{out}/kohya_resized.safetensors",
                      "--new_rank", "8", "--save_precision", "fp16", "--device", "cpu"]),
    "merge into checkpoint": (["scripts/locon_loha_merge.py", "--base", "{ckpt}", "--lycoris", "{lora}",
                               "--weight", "1", "--save_to", "{out}/ours_merged.safetensors", "--dtype", "fp16",
                               "--overwrite"],
                              ["networks/merge_lora.py", "--sd_model", "{ckpt}", "--models", "{lora}", "--ratios", "1",
                               "--save_to", "{out}/kohya_merged.safetensors", "--save_precision", "fp16"]),
    "SVD merge 2x16->16": (["scripts/lora_merge.py", "--models", "{lora}", "{lora}", "--ratios", "0.6", "0.4",
                            "--new_rank", "16", "--save_to", "{out}/ours_svd.safetensors", "--save_precision", "fp16",
                            "--device", "cpu", "--overwrite"],
                           ["networks/svd_merge_lora.py", "--models", "{lora}", "{lora}", "--ratios", "0.6", "0.4",
                            "--new_rank", "16", "--save_to", "{out}/kohya_svd.safetensors", "--save_precision", "fp16",
                            "--device", "cpu"]),
    # both extract from the checkpoint our merge wrote (the row above), with kohya's default clamp quantile
    "extract rank 16": (["scripts/locon_extract.py", "--base", "{ckpt}", "--tuned", "{out}/ours_merged.safetensors",
                         "--linear_param", "16", "--clamp_quantile", "0.99", "--save_to", "{out}/ours_extracted.safetensors",
                         "--save_precision", "fp16", "--device", "cpu", "--overwrite"],
                        ["networks/extract_lora_from_models.py", "--model_org", "{ckpt}",
                         "--model_tuned", "{out}/ours_merged.safetensors", "--dim", "16", "--clamp_quantile", "0.99",
                         "--save_to", "{out}/kohya_extracted.safetensors", "--save_precision", "fp16", "--device", "cpu"]),
}


def compare_tools(assets: dict, opts, env: dict) -> None:
    lora = next((Path(opts.cache) / "out").glob("ours_*_0/bench.safetensors"), None)
    if lora is None:
        print("tools: no trained LoRA under the cache yet; run a training row first")
        return
    out = Path(opts.cache) / "out" / "tools"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'tool':24s} {'ours wall s':>11s} {'kohya wall s':>12s} {'ratio':>6s} {'ours CPU s':>10s} "
          f"{'kohya CPU s':>11s} {'ratio':>6s} {'ours RSS GB':>11s} {'kohya RSS GB':>12s}")
    for name, (ours, theirs) in TOOL_CASES.items():
        fill = {"lora": str(lora), "ckpt": str(assets["ckpt"]), "out": str(out)}
        result = {}
        for trial in range(opts.trials):
            for tool, cmd, python, cwd in (("ours", ours, sys.executable, ROOT),
                                           ("kohya", theirs, opts.kohya_python, Path(opts.kohya))):
                argv = [python, *[c.format(**fill) for c in cmd]]
                start = time.time()
                proc = subprocess.Popen(argv, cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.time() - start
                if os.waitstatus_to_exitcode(status) != 0:
                    print(f"  {name}: {tool} failed: {proc.stderr.read().decode(errors='replace').strip()[-300:]}")
                    continue
                cpu = usage.ru_utime + usage.ru_stime
                prev = result.get(tool, (float("inf"), float("inf"), 0))
                result[tool] = (min(prev[0], wall), min(prev[1], cpu), max(prev[2], usage.ru_maxrss / 2**20))
        if "ours" in result and "kohya" in result:
            (ow, oc, orss), (kw, kc, krss) = result["ours"], result["kohya"]
            print(f"{name:24s} {ow:11.1f} {kw:12.1f} {ow / kw:6.2f} {oc:10.1f} {kc:11.1f} {oc / kc:6.2f} "
                  f"{orss:11.2f} {krss:12.2f}", flush=True)


# -------------------------------------------------------------------------------------------------- main


def versions(opts) -> str:
    ours = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cs"], capture_output=True, text=True).stdout
    theirs = subprocess.run(["git", "-C", str(opts.kohya), "log", "-1", "--format=%h %cs"], capture_output=True,
                            text=True).stdout
    torch_of = "import torch, sys; print(torch.__version__)"
    t_ours = subprocess.run([sys.executable, "-c", torch_of], capture_output=True, text=True).stdout.strip()
    t_theirs = subprocess.run([opts.kohya_python, "-c", torch_of], capture_output=True, text=True).stdout.strip()
    return (f"ours {ours.strip()} (torch {t_ours}); kohya sd-scripts {theirs.strip()} (torch {t_theirs}); "
            f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kohya", help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--kohya_python", help="the Python of kohya's own environment")
    parser.add_argument("--cache", default=str(ROOT / "bench" / ".vs_kohya"), help="checkpoint, data, logs, outputs")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="step gaps left out of each run's steady steps")
    parser.add_argument("--trials", type=int, default=2, help="runs per tool and row (interleaved)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--ours_args", default="", help="extra arguments for our runs only (e.g. --torch_compile)")
    parser.add_argument("--tools", action="store_true", help="time the LoRA tools kohya also has (after a row)")
    parser.add_argument("--build_checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.build_checkpoint:
        sys.path.insert(0, str(ROOT))
        _write_checkpoint(Path(opts.build_checkpoint))
        return 0
    if not opts.kohya or not opts.kohya_python:
        print(HOW_TO_GET_KOHYA)
        return 2
    if not (Path(opts.kohya) / "train_network.py").is_file():
        print(f"--kohya: {opts.kohya} has no train_network.py; give a checkout of kohya-ss/sd-scripts")
        return 2
    sys.path.insert(0, str(ROOT))
    rows = [ROWS[k] for k in opts.rows.split(",") if k]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    assets = ensure_assets(Path(opts.cache), {r.size for r in rows}, opts.images)
    print(versions(opts))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: {opts.steps} steps per run, the first {opts.warmup} gaps left out, "
          f"{opts.trials} interleaved trials; ours extra: {opts.ours_args or '-'}", flush=True)
    results = [(row, compare_row(row, assets, opts, env)) for row in rows]
    print()
    print_table(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (Path(opts.cache) / f"results-{stamp}.json").write_text(json.dumps(
        {"versions": versions(opts), "ours_args": opts.ours_args, "steps": opts.steps,
         "rows": [{"row": r.title, **res} for r, res in results]}, indent=1), encoding="utf-8")
    if opts.tools:
        print()
        compare_tools(assets, opts, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
