"""kohya's SDXL entry point ``python -m sd_scripts.sdxl_train_network``: a kohya SDXL command line (with its SDXL
flags) trains; an SD1 model or ``--no-sdxl`` is one line and exit 2 with nothing written; and
``--disable_mmap_load_safetensors`` reads the same weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import make_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _argv(model, data, out, *extra):
    from sd_scripts.testing.tiny_models import tiny_tokenizer_cache_dir

    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "xl", "--resolution", "64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--max_train_steps", "2", "--train_batch_size", "2", "--network_module",
            "networks.lora", "--network_dim", "2", "--network_alpha", "1", "--optimizer_type", "AdamW",
            "--mixed_precision", "no", "--max_data_loader_n_workers", "0", "--seed", "1", *extra]
    if Path(model).is_file():
        argv += ["--tokenizer_cache_dir", str(tiny_tokenizer_cache_dir(model))]
    return argv


def test_a_kohya_sdxl_command_line_trains(tiny_sdxl_single_file, tmp_path, capsys):
    from sd_scripts import sdxl_train_network

    data = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    code = sdxl_train_network.main(_argv(tiny_sdxl_single_file, data, out, "--network_train_unet_only",
                                         "--cache_text_encoder_outputs", "--no_half_vae",
                                         "--disable_mmap_load_safetensors"))
    assert code == 0, capsys.readouterr().err
    with safe_open(str(out / "xl.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_an_sd1_model_or_no_sdxl_is_one_line_and_writes_nothing(tiny_sd1_diffusers, tiny_sdxl_diffusers, tmp_path):
    data = make_dataset(tmp_path / "data", count=1)
    cases = [(tiny_sd1_diffusers, []), (tiny_sdxl_diffusers, ["--no-sdxl"])]
    for i, (model, extra) in enumerate(cases):
        out = tmp_path / f"out{i}"
        proc = subprocess.run([sys.executable, "-m", "sd_scripts.sdxl_train_network", *_argv(model, data, out, *extra)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                   "PYTHONPATH": str(ROOT)})
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: sdxl: "), proc.stderr
        assert "use train_network.py" in lines[0]  # not "unset sdxl": this script cannot
        assert not out.exists() or not any(out.iterdir())


def test_reading_without_mmap_gives_the_same_tensors(tiny_sdxl_single_file):
    from sd_scripts.models.loading import read_checkpoint

    mapped, meta = read_checkpoint(str(tiny_sdxl_single_file))
    read, meta2 = read_checkpoint(str(tiny_sdxl_single_file), mmap=False)
    assert meta == meta2 and mapped.keys() == read.keys()
    assert all(torch.equal(mapped[k], read[k]) and mapped[k].dtype == read[k].dtype for k in mapped)
