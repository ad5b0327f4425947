"""Several processes (``accelerate launch``) draw their own noise, timesteps and dropout.

Processes other than 0 switch, when training starts, to a stream seeded by ``process_seed(seed,
process index, step)``; process 0 keeps the single-process stream; a state holds every process's
random states, so a multi-process resume is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts.training.state import capture_rng, process_seed, saved_rng_of
from tests.helpers import make_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_process_seed_is_deterministic_and_distinct():
    assert process_seed(42, 1) == process_seed(42, 1, 0) == process_seed(42, 1, step=0)
    seeds = {process_seed(seed, index, step) for seed in (0, 42) for index in range(4) for step in (0, 3)}
    assert len(seeds) == 16, "every (seed, process, step) starts its own stream"
    assert all(0 <= s < 2**32 for s in seeds), "numpy takes 32-bit seeds"


def test_saved_rng_of_picks_the_process_own_states():
    torch.manual_seed(1)
    first = capture_rng()
    torch.manual_seed(2)
    second = capture_rng()
    assert saved_rng_of([first, second], 0) is first
    assert saved_rng_of([first, second], 1) is second
    assert saved_rng_of([first], 0) is first
    assert saved_rng_of([first], 1) is None, "a process missing from the state starts its own stream"
    assert saved_rng_of([], 0) is None
    # a state saved when every process drew the same numbers: the others start their own streams
    assert saved_rng_of([first, first], 0) is first
    assert saved_rng_of([first, first], 1) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def same_images(tmp_path_factory) -> Path:
    """4 copies of one image and caption: processes differ only in what they draw at random."""
    root = make_dataset(tmp_path_factory.mktemp("streams") / "data", folder="1_sks shape", count=1)
    sub = root / "1_sks shape"
    for i in range(1, 4):
        shutil.copy(sub / "img00.png", sub / f"img{i:02d}.png")
        shutil.copy(sub / "img00.txt", sub / f"img{i:02d}.txt")
    return root


@pytest.mark.slow
def test_two_processes_draw_their_own_noise_and_resume_exactly(tiny_sd1_diffusers, same_images, tmp_path):
    from sd_scripts.training.loop import train
    from tests.multiprocess_train import RESUME_STEP, SETTINGS

    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "out"
    # torchrun-style processes (--multi_gpu) that accelerate runs on the CPU with gloo (ACCELERATE_USE_CPU)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), ACCELERATE_USE_CPU="1")
    cmd = [str(launcher if launcher.exists() else "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "multiprocess_train.py"), str(tiny_sd1_diffusers), str(same_images), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads((out / f"losses-{i}.json").read_text()) for i in range(2)]
    assert [log["num_processes"] for log in logs] == [2, 2]
    ref0, ref1 = logs[0]["reference"], logs[1]["reference"]
    assert len(ref0) == len(ref1) == SETTINGS["max_train_steps"]
    # same weights, picture and caption: only the random draws can tell the processes apart
    assert all(a != b for a, b in zip(ref0, ref1)), (ref0, ref1)

    # process 0 draws what a single process draws (its first loss comes before any update)
    one_step = {**SETTINGS, "max_train_steps": 1}
    single = train(tiny_config(tiny_sd1_diffusers, same_images, tmp_path / "single", **one_step))
    assert single.losses[0] == ref0[0]

    # exact resume: every process continues its own stream from the state
    for log in logs:
        assert log["resumed"] == log["reference"][RESUME_STEP:]
    ref_sd = load_file(out / "reference" / "tiny.safetensors")
    resumed_sd = load_file(out / "resumed" / "tiny.safetensors")
    assert ref_sd.keys() == resumed_sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], resumed_sd[key]), f"{key} differs after resuming"
    with safe_open(str(out / "reference" / "tiny.safetensors"), "pt") as f:
        assert f.metadata()["ss_seed"] == "42", "the metadata keeps the user's seed"


def test_processes_load_the_model_one_at_a_time():
    """kohya's order: process k loads in turn k, everyone waits after each turn (RAM for one copy at a time)."""
    from sd_scripts.training.setup import _in_turn

    events: list[str] = []

    class Accelerator:
        num_processes, local_process_index = 3, 1

        def wait_for_everyone(self):
            events.append("wait")

    assert _in_turn(Accelerator(), lambda: events.append("load") or "model") == "model"
    assert events == ["wait", "load", "wait", "wait"]
