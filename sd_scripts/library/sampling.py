"""Sample images during training: kohya's prompt-file syntax, samplers and file names.

A prompt line is ``text --n negative --w 512 --h 512 --d seed --l cfg --s steps --ss sampler``.
Lines that are empty or start with ``#`` are skipped. Images go to ``<output_dir>/sample/``
named ``{output_name}_{e000001|000100}_{index:02d}_{YYYYmmddHHMMSS}_{seed}.png``, and one
grid image per sampling point (``..._grid.png``) shows all prompts side by side.
Sampling saves and restores the random-number state, so training continues as if it had
not sampled.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

__all__ = ["SamplePrompt", "SAMPLERS", "parse_prompt_line", "load_sample_prompts", "make_sampler", "generate_samples"]

# kohya sampler names -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
for _alias in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    SAMPLERS["k_" + _alias] = SAMPLERS[_alias]

_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps", "ss": "sampler"}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    sample_steps: int = 30
    sampler: str | None = None
    extra: dict = field(default_factory=dict)


def parse_prompt_line(line: str, where: str = "sample_prompts") -> SamplePrompt:
    """Parse one kohya prompt line; a bad option raises ConfigError naming it."""
    parts = (" " + line).split(" --")
    prompt = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        if key not in _OPTIONS:
            raise ConfigError(f"{where}: unknown option --{key} (use --n, --w, --h, --d, --l, --s or --ss)")
        name = _OPTIONS[key]
        try:
            if name in ("width", "height", "seed", "sample_steps"):
                setattr(prompt, name, int(value))
            elif name == "scale":
                setattr(prompt, name, float(value))
            elif name == "sampler":
                if value.lower() not in SAMPLERS:
                    raise ValueError
                prompt.sampler = value.lower()
            else:
                prompt.negative_prompt = value
        except ValueError:
            raise ConfigError(f"{where}: --{key} has the bad value {value!r}") from None
    prompt.width = max(64, prompt.width // 8 * 8)
    prompt.height = max(64, prompt.height // 8 * 8)
    prompt.sample_steps = min(max(prompt.sample_steps, 1), 1000)
    return prompt


def load_sample_prompts(path: str) -> list[SamplePrompt]:
    """Read a .txt (one prompt per line) or .json (list of strings or dicts) prompt file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sample_prompts: file not found: {path}; give an existing prompt file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"sample_prompts: {path} is not UTF-8 text; save it as UTF-8") from None
    prompts: list[SamplePrompt] = []
    if p.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sample_prompts: {path} line {e.lineno} column {e.colno}: {e.msg}") from None
        for item in items:
            if isinstance(item, str):
                prompts.append(parse_prompt_line(item))
            else:
                prompts.append(SamplePrompt(prompt=item.get("prompt", ""), negative_prompt=item.get("negative_prompt", ""),
                                            width=int(item.get("width", 512)), height=int(item.get("height", 512)),
                                            seed=item.get("seed"), scale=float(item.get("scale", 7.5)),
                                            sample_steps=int(item.get("sample_steps", 30)), sampler=item.get("sample_sampler")))
        return prompts
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, where=f"sample_prompts line {number}"))
    return prompts


def make_sampler(name: str, v_parameterization: bool):
    import diffusers

    if name.lower() not in SAMPLERS:
        raise ConfigError(f"sample_sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name.lower()]
    cls = getattr(diffusers, cls_name)
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction" if v_parameterization else "epsilon", **extra)
    if cls_name == "DDIMScheduler":
        kwargs.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if cls_name == "PNDMScheduler":
        kwargs.update(skip_prk_steps=True, steps_offset=1)
    return cls(**kwargs)


def generate_samples(model, prompts: list[SamplePrompt], *, out_dir: str, output_name: str | None, label: str,
                     default_sampler: str, v_parameterization: bool, clip_skip: int | None, device) -> list[str]:
    """Generate one image per prompt with the current (training) weights; return the file paths."""
    import torch
    from PIL import Image

    from .atomic import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    stamp = time.strftime("%Y%m%d%H%M%S")
    prefix = f"{output_name}_" if output_name else ""
    paths: list[str] = []
    images = []
    try:
        for i, sp in enumerate(prompts):
            scheduler = make_sampler(sp.sampler or default_sampler, v_parameterization)
            pipe = model.family.build_pipeline(model, scheduler)
            pipe.set_progress_bar_config(disable=True)
            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.no_grad():
                image = pipe(prompt=sp.prompt, negative_prompt=sp.negative_prompt or None, width=sp.width,
                             height=sp.height, num_inference_steps=sp.sample_steps, guidance_scale=sp.scale,
                             generator=generator, clip_skip=_pipeline_clip_skip(clip_skip)).images[0]
            path = os.path.join(out_dir, f"{prefix}{label}_{i:02d}_{stamp}_{seed}.png")
            with atomic_write(path) as f:
                image.save(f, format="PNG")
            paths.append(path)
            images.append(image)
        if len(images) > 1:
            grid = _grid(images, Image)
            path = os.path.join(out_dir, f"{prefix}{label}_grid_{stamp}.png")
            with atomic_write(path) as f:
                grid.save(f, format="PNG")
            paths.append(path)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return paths


def _pipeline_clip_skip(clip_skip: int | None) -> int | None:
    # diffusers counts skipped layers (1 = penultimate); kohya/A1111 count from 1 = last layer.
    if clip_skip is None or clip_skip <= 1:
        return None
    return clip_skip - 1


def _grid(images, Image):
    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def describe_prompt(sp: SamplePrompt) -> str:
    return shlex.quote(sp.prompt)
