"""`accelerate launch main.py` runs the same training on CPU with no accelerate config file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_accelerate_launch_cpu(tiny_sd1_diffusers, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    data = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [str(launcher if launcher.exists() else "accelerate"), "launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(ROOT / "main.py"), "--base_model", str(tiny_sd1_diffusers), "--img_folder", str(data),
           "--output_folder", str(out), "--change_output_name", "acc", "--train_resolution", "64",
           "--min_bucket_resolution", "64", "--max_bucket_resolution", "64", "--max_steps", "2", "--net_dim", "2",
           "--alpha", "1", "--optimizer_type", "AdamW", "--mixed_precision", "no", "--batch_size", "1",
           "--tag_occurrence_txt_file", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "acc.safetensors").is_file()
