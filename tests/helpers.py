"""Small builders shared by tests: datasets of generated images, tiny training configs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "white": (240, 240, 240)}


def make_dataset(root: Path, folder: str = "5_sks shape", count: int = 4, size=(64, 64), captions: bool = True) -> Path:
    """``root/<folder>/`` with ``count`` PNG images (and .txt captions); returns ``root``."""
    from PIL import Image, ImageDraw

    sub = Path(root) / folder
    sub.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(count):
        name = names[i % len(names)]
        im = Image.new("RGB", size, (20 + 10 * i, 20, 30))
        d = ImageDraw.Draw(im)
        d.ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=COLORS[name])
        im.save(sub / f"img{i:02d}.png")
        if captions:
            (sub / f"img{i:02d}.txt").write_text(f"sks shape, {name}, circle", encoding="utf-8")
    return Path(root)


def tree_digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (to prove a dataset was not modified)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiny_config(model: Path, data: Path, out: Path, **overrides):
    from sd_scripts.core.config import TrainConfig

    values = dict(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        output_dir=str(out),
        output_name="tiny",
        resolution="64",
        min_bucket_reso=64,
        max_bucket_reso=128,
        bucket_reso_steps=64,
        train_batch_size=2,
        max_train_steps=4,
        learning_rate=1e-3,
        network_dim=4,
        network_alpha=2.0,
        seed=42,
        optimizer_type="AdamW",
    )
    values.update(overrides)
    return TrainConfig(**values)


def modules_of(state_dict) -> dict[str, set[str]]:
    """``{module name: {tensor parts}}`` of a kohya/LyCORIS file's state dict (``name.part`` keys)."""
    out: dict[str, set[str]] = {}
    for key in state_dict:
        name, _, part = key.partition(".")
        out.setdefault(name, set()).add(part)
    return out


def saved_random_lora(net, path, metadata, precision):
    """``net`` with random up weights (seed 1, so every module changes the model), saved with the project's saver
    at ``precision`` and read back: ``(state_dict, metadata)``."""
    import torch

    from sd_scripts.files.lora_file import load_lora_file, precision_dtype, save_lora_file

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.3)
    save_lora_file(path, net.kohya_state_dict(), metadata, precision_dtype(precision))
    return load_lora_file(path)


def load_tool(name: str):
    """The module of ``scripts/<name>.py``, loaded the way its launcher runs it (as a script, not a package)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", root / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, argv, capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``scripts/<name>.py`` run in this process."""
    tool = load_tool(name)
    code = tool.cli.run(tool.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def flux_settings(files: dict) -> dict:
    """kohya settings naming every part of a tiny FLUX.1 written by ``save_tiny_flux_files``."""
    return {"pretrained_model_name_or_path": str(files["transformer"]), "clip_l": str(files["clip_l"]),
            "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"]),
            "tokenizer_cache_dir": str(files["tokenizer_cache_dir"])}
