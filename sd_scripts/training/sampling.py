"""Sample images during training: kohya's prompt files, samplers and file names.

Prompt files, as kohya reads them:

* ``.txt``: one prompt per line, ``text --n negative --w 512 --h 512 --d seed --l cfg --s steps --ss sampler``
  (FLUX.1: ``--g`` guidance, 3.5 by default; ``--l`` true CFG only when given; 20 steps unless ``--s``);
  empty lines and lines starting with ``#`` are skipped;
* ``.json``: a list of such strings, or of dicts with ``prompt, negative_prompt, width, height, seed,
  scale, sample_steps, sample_sampler``;
* ``.toml``: ``[prompt]`` holds defaults (same keys) and ``[[prompt.subset]]`` the prompts.

An unknown option or a bad value is a :class:`ConfigError` naming the line, so preflight stops a
run before the model loads. ``sample_sampler`` and ``--ss`` accept every name kohya accepts
(:data:`SAMPLERS`). Images go to ``<output_dir>/sample/`` named as kohya names them,
``{output_name}_{e000001|000100}_{index:02d}_{YYYYmmddHHMMSS}[_{seed}].png`` (the seed suffix when the
prompt gives ``--d``), plus one grid per sampling point (``..._grid_{YYYYmmddHHMMSS}.png``) with all
prompts side by side. Sampling saves and restores every random-number state, so training continues
exactly as if it had not sampled.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems

__all__ = ["SamplePrompt", "SAMPLERS", "SamplingAborted", "parse_prompt_line", "load_sample_prompts", "make_sampler",
           "zero_terminal_snr_sampler", "generate_samples", "sample_file_name", "sampler_problem", "check_sampling_settings"]

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
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
for _alias in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    SAMPLERS["k_" + _alias] = SAMPLERS[_alias]

# Samplers whose diffusers class needs an optional package.
_NEEDS = {"LMSDiscreteScheduler": "scipy"}

_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps",
            "ss": "sampler", "g": "guidance_scale"}
# kohya options for other model families (SD3, Lumina, ControlNet): named in the error
_OTHER_FAMILY_OPTIONS = {"cn", "ctr", "rcfg", "fs", "am", "f", "c", "t"}
_JSON_KEYS = {"prompt", "negative_prompt", "width", "height", "seed", "scale", "sample_steps", "sample_sampler", "sampler",
              "enum", "guidance_scale"}


class SamplingAborted(Exception):
    """Raised inside sampling when the caller asked to stop (Ctrl+C); no image of that prompt is written."""


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
    guidance_scale: float | None = None  # --g: FLUX.1 dev's embedded guidance (3.5 when not given)
    extra: dict = field(default_factory=dict)
    given: set = field(default_factory=set)  # the options the prompt set (FLUX.1 has other defaults for the rest)

    def normalise(self) -> "SamplePrompt":
        """kohya's limits: sides floored to multiples of 8 (64 at least), 1..1000 steps."""
        self.width = max(64, int(self.width) // 8 * 8)
        self.height = max(64, int(self.height) // 8 * 8)
        self.sample_steps = min(max(int(self.sample_steps), 1), 1000)
        return self


def sampler_problem(name: str) -> str | None:
    """Why sampler ``name`` cannot be used here (unknown, or its package is missing), or None."""
    key = str(name).strip().lower()
    if key not in SAMPLERS:
        return f"{name!r} is not a sampler; choose one of {', '.join(SAMPLERS)}"
    package = _NEEDS.get(SAMPLERS[key][0])
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            return (f"{key} needs the {package} package, which is not installed; install it (pip install {package}) "
                    "or choose another sampler such as euler or ddim")
    return None


def check_sampling_settings(config: TrainConfig, problems: Problems | None = None) -> list[ConfigError]:
    """Sampler availability for ``sample_sampler`` (names are checked by preflight; --ss by the prompt file),
    recorded in ``problems``, whose errors it returns."""
    problems = Problems() if problems is None else problems
    if config.sample_prompts and config.sample_sampler:
        problem = sampler_problem(config.sample_sampler)
        if problem:
            problems.error("sample_sampler", problem)
    return problems.errors


def _set_option(prompt: SamplePrompt, key: str, name: str, value: Any, where: str) -> None:
    try:
        if name in ("width", "height", "sample_steps"):
            number = int(str(value).strip())
            if number < 1:
                raise ValueError
            setattr(prompt, name, number)
        elif name == "seed":
            setattr(prompt, name, int(str(value).strip()))
        elif name in ("scale", "guidance_scale"):
            setattr(prompt, name, float(str(value).strip()))
        elif name == "sampler":
            text = str(value).strip().lower()
            problem = sampler_problem(text)
            if problem:
                raise ConfigError(f"{where}: --{key} {problem}", "sample_prompts")
            prompt.sampler = text
        else:
            prompt.negative_prompt = str(value).strip()
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: --{key} has the bad value {value!r}; fix the prompt file", "sample_prompts") from None
    prompt.given.add(name)


def parse_prompt_line(line: str, where: str = "sample_prompts") -> SamplePrompt:
    """Parse one kohya prompt line; a bad option raises ConfigError naming it."""
    parts = (" " + line).split(" --")
    prompt = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key = key.strip()
        if key not in _OPTIONS:
            if key in _OTHER_FAMILY_OPTIONS:
                raise ConfigError(f"{where}: --{key} is a kohya option for other model families, not for Stable "
                                  "Diffusion or FLUX.1; remove it (use --n, --w, --h, --d, --l, --s, --ss, --g)",
                                  "sample_prompts")
            raise ConfigError(f"{where}: unknown option --{key} (use --n, --w, --h, --d, --l, --s, --ss or --g)",
                              "sample_prompts")
        if not value.strip() and key != "n":
            raise ConfigError(f"{where}: --{key} has no value; write e.g. --{key} {_EXAMPLES[key]}", "sample_prompts")
        _set_option(prompt, key, _OPTIONS[key], value, where)
    if not prompt.prompt:
        raise ConfigError(f"{where}: the prompt text is empty; write the prompt before its --options", "sample_prompts")
    return prompt.normalise()


_EXAMPLES = {"w": "512", "h": "512", "d": "1234", "l": "7.5", "s": "28", "ss": "euler_a", "n": "blurry", "g": "3.5"}


def _from_dict(item: dict, where: str, defaults: dict | None = None) -> SamplePrompt:
    merged = dict(defaults or {})
    merged.update(item)
    unknown = sorted(set(merged) - _JSON_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; use prompt, negative_prompt, width, height, seed, scale, "
                          "sample_steps, sample_sampler, guidance_scale", "sample_prompts")
    text = merged.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: no prompt text; give \"prompt\"", "sample_prompts")
    prompt = SamplePrompt(prompt=text.strip())
    keys = {"negative_prompt": "n", "width": "w", "height": "h", "seed": "d", "scale": "l", "sample_steps": "s",
            "sample_sampler": "ss", "sampler": "ss", "guidance_scale": "g"}
    for name, key in keys.items():
        if merged.get(name) is not None:
            _set_option(prompt, key, _OPTIONS[key], merged[name], where)
    return prompt.normalise()


def load_sample_prompts(path: str) -> list[SamplePrompt]:
    """Read a ``.txt``, ``.json`` or ``.toml`` prompt file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sample_prompts: file not found: {path}; give an existing prompt file", "sample_prompts")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"sample_prompts: {path} is not UTF-8 text; save it as UTF-8", "sample_prompts") from None
    suffix = p.suffix.lower()
    prompts: list[SamplePrompt] = []
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sample_prompts: {path} line {e.lineno} column {e.colno}: {e.msg}", "sample_prompts") from None
        if not isinstance(items, list):
            raise ConfigError(f"sample_prompts: {path} must hold a JSON list of prompts", "sample_prompts")
        for i, item in enumerate(items, 1):
            where = f"sample_prompts item {i}"
            if isinstance(item, str):
                prompts.append(parse_prompt_line(item, where))
            elif isinstance(item, dict):
                prompts.append(_from_dict(item, where))
            else:
                raise ConfigError(f"{where}: must be a prompt string or an object with \"prompt\"", "sample_prompts")
        return prompts
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sample_prompts: {path}: {e}", "sample_prompts") from None
        section = data.get("prompt")
        if not isinstance(section, dict):
            raise ConfigError(f"sample_prompts: {path} has no [prompt] table; see kohya's prompt TOML format", "sample_prompts")
        defaults = {k: v for k, v in section.items() if k != "subset"}
        subsets = section.get("subset") or ([{}] if "prompt" in defaults else [])
        if not isinstance(subsets, list):
            raise ConfigError(f"sample_prompts: {path}: prompt.subset must be a list of tables ([[prompt.subset]])",
                              "sample_prompts")
        for i, item in enumerate(subsets, 1):
            if not isinstance(item, dict):
                raise ConfigError(f"sample_prompts: {path}: prompt.subset {i} is not a table", "sample_prompts")
            prompts.append(_from_dict(item, f"sample_prompts prompt.subset {i}", defaults))
        return prompts
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, where=f"sample_prompts line {number}"))
    return prompts


def make_sampler(name: str, v_parameterization: bool):
    """The diffusers scheduler for a kohya sampler name."""
    import diffusers

    problem = sampler_problem(name)
    if problem:
        raise ConfigError(f"sample_sampler: {problem}", "sample_sampler")
    cls_name, extra = SAMPLERS[name.lower()]
    cls = getattr(diffusers, cls_name)
    # Stable Diffusion's own scheduler settings (steps_offset 1, as in every SD scheduler config)
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction" if v_parameterization else "epsilon", steps_offset=1, **extra)
    if cls_name == "DDIMScheduler":
        kwargs.update(clip_sample=False, set_alpha_to_one=False)
    if cls_name == "PNDMScheduler":
        kwargs.update(skip_prk_steps=True)
    import inspect

    import warnings

    accepted = inspect.signature(cls.__init__).parameters
    with warnings.catch_warnings():  # diffusers deprecates algorithm_type dpmsolver, which kohya's name means
        warnings.simplefilter("ignore", FutureWarning)
        return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def zero_terminal_snr_sampler(scheduler):
    """The same sampler on the zero-terminal-SNR schedule a ``zero_terminal_snr`` LoRA trains on, with "trailing"
    timestep spacing so that sampling starts from the pure-noise timestep (Lin et al. 2023, arXiv 2305.08891).
    The last alphas_cumprod is 2**-24 rather than 0, as diffusers' ``rescale_betas_zero_snr`` makes it for its
    sigma samplers: every sampler can start there (an epsilon prediction at SNR 0 gives no image)."""
    import inspect

    import torch

    from sd_scripts.training.noise import make_noise_scheduler

    alphas_cumprod = make_noise_scheduler(False, zero_terminal_snr=True).alphas_cumprod.clone()
    alphas_cumprod[-1] = 2**-24
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    changes: dict[str, Any] = {"trained_betas": (1.0 - alphas).tolist()}
    if "timestep_spacing" in inspect.signature(type(scheduler).__init__).parameters:
        changes["timestep_spacing"] = "trailing"
    return type(scheduler).from_config(scheduler.config, **changes)


def sample_file_name(output_name: str | None, label: str, index: int, stamp: str, seed: int | None) -> str:
    """kohya's sample image name: ``{output_name}_{label}_{index:02d}_{stamp}[_{seed}].png``."""
    prefix = f"{output_name}_" if output_name else ""
    suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{label}_{index:02d}_{stamp}{suffix}.png"


@contextlib.contextmanager
def preserved_rng():
    """Save python, numpy, torch CPU and CUDA random states; restore them on exit."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def generate_samples(model, prompts: list[SamplePrompt], *, out_dir: str, output_name: str | None, label: str,
                     default_sampler: str, v_parameterization: bool, clip_skip: int | None, device,
                     autocast: Callable[[], Any] | None = None, should_stop: Callable[[], bool] | None = None,
                     header: str | None = None, zero_terminal_snr: bool = False) -> list[str]:
    """Generate one image per prompt with the current (training) weights; return the file paths
    (the images, then the grid when there are several prompts).

    ``autocast`` is a context-manager factory (the accelerator's) for mixed precision;
    ``should_stop`` is polled between denoising steps and raises :class:`SamplingAborted` when true.
    ``zero_terminal_snr`` samples on that schedule (:func:`zero_terminal_snr_sampler`), as the LoRA was trained.
    """
    import torch
    from PIL import Image

    from sd_scripts.files.atomic import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d%H%M%S")
    paths: list[str] = []
    images = []

    def on_step_end(pipe, step, timestep, kwargs):
        if should_stop is not None and should_stop():
            raise SamplingAborted()
        return kwargs

    with preserved_rng():
        for i, sp in enumerate(prompts):
            if should_stop is not None and should_stop():
                raise SamplingAborted()
            def make_scheduler(sp=sp):
                scheduler = make_sampler(sp.sampler or default_sampler, v_parameterization)
                return zero_terminal_snr_sampler(scheduler) if zero_terminal_snr else scheduler

            seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
                image = model.family.sample_image(model, sp, make_scheduler, generator, on_step_end,
                                                  clip_skip=_pipeline_clip_skip(clip_skip))
            path = os.path.join(out_dir, sample_file_name(output_name, label, i, stamp, sp.seed))
            with atomic_write(path) as f:
                image.save(f, format="PNG")
            paths.append(path)
            images.append(image)
    if len(images) > 1:
        grid = _grid(images, Image, header or label)
        prefix = f"{output_name}_" if output_name else ""
        path = os.path.join(out_dir, f"{prefix}{label}_grid_{stamp}.png")
        with atomic_write(path) as f:
            grid.save(f, format="PNG")
        paths.append(path)
    return paths


def _pipeline_clip_skip(clip_skip: int | None) -> int | None:
    # diffusers counts skipped layers (1 = penultimate); kohya/A1111 count from 1 = last layer.
    if clip_skip is None or clip_skip <= 1:
        return None
    return clip_skip - 1


def _grid(images, Image, header: str = ""):
    """All images in rows of up to 4, each in a cell of the largest size, under a one-line header."""
    from PIL import ImageDraw, ImageFont

    cols = min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    top = 20 if header else 0
    grid = Image.new("RGB", (cols * w, rows * h + top), "white")
    if header:
        ImageDraw.Draw(grid).text((4, top // 2), header, fill=(30, 30, 30), font=ImageFont.load_default(), anchor="lm")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w + (w - im.width) // 2, top + (i // cols) * h + (h - im.height) // 2))
    return grid
