"""Crash recovery and the out-of-memory retry on real (tiny) trainings through ``main.py --multi_run_path``.

The kill test starts the queue, kills it with SIGKILL at random moments -- while it checks the
jobs, while the job starts, between steps, in the middle of saving a state -- at least ten times,
runs the same command once more, and compares the LoRA with one from an uninterrupted queue, bit
for bit. The moments come from a seed printed on failure (``KILL_SEED=... pytest ...`` repeats them).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
STEPS = 40
LEFT = 12  # steps no kill waits for: the job must still be running when the kill comes


def _dataset(tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "2_shape"
    data.mkdir(parents=True)
    for i, color in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 64), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"shape, {color}", encoding="utf-8")
    return tmp_path / "data"


def _job(model, data, out, **changes) -> str:
    settings = {"base_model": str(model), "img_folder": str(data), "output_folder": str(out),
                "tokenizer_cache_dir": str(model / "tokenizer"), "change_output_name": "night",
                "train_resolution": 64, "min_bucket_resolution": 64, "max_bucket_resolution": 128,
                "bucket_reso_steps": 32, "max_steps": STEPS, "net_dim": 4, "alpha": 2, "clip_skip": 1,
                "optimizer_type": "AdamW", "mixed_precision": "no", "xformers": False, "cache_latents": True,
                "num_workers": 0, "test_seed": 7, "learning_rate": 1e-3,
                "queue_state_every": 1e-6}  # a state after every step, so that kills land everywhere
    settings.update(changes)
    return json.dumps(settings)


def _queue(tmp_path, name, model, data, **changes):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "job.json").write_text(_job(model, data, tmp_path / f"{name}-out", **changes), encoding="utf-8")
    return folder


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run(folder, **env):
    return subprocess.run([sys.executable, MAIN, "--multi_run_path", str(folder)], capture_output=True, text=True,
                          timeout=600, env=_env(**env))


def _events_after(path, offset: int) -> dict[str, list[int]]:
    """The events the job wrote into its progress file after byte ``offset``: {"start": [...], "step": [steps]}."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return {}
    found: dict[str, list[int]] = {}
    for kind, step in re.findall(r'"event": "(start|step)", "time": [0-9.e+-]+, (?:"step": (\d+))?', text):
        found.setdefault(kind, []).append(int(step or 0))
    return found


def _state_step(state) -> int:
    try:
        return int(json.loads((state / "train_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def _jobs_of(folder) -> list[int]:
    """Our own queue's job processes still alive (found by the queue folder in their command line)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().decode("utf-8", "replace")
        except OSError:
            continue
        if "frontend.job" in cmdline and str(folder) in cmdline:
            pids.append(int(pid))
    return pids


def _train_here(job) -> None:
    from frontend.resolve import resolve_settings
    from frontend.training import run_training

    run_training(resolve_settings({"load_json_path": str(job)}).store, say=lambda text: None)


def _same_tensors(a, b) -> None:
    import torch
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, and /proc to check no job outlives it")
def test_killed_queue_resumes_and_ends_with_the_same_lora(tmp_path, tiny_sd1_diffusers):
    seed = int(os.environ.get("KILL_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    data = _dataset(tmp_path)
    reference = _queue(tmp_path, "reference", tiny_sd1_diffusers, data)
    _train_here(reference / "job.json")  # uninterrupted, in this process

    folder = _queue(tmp_path, "killed", tiny_sd1_diffusers, data)
    events = folder / "queue_state" / "job.json" / "progress.jsonl"
    kills = []
    during_training = set(rng.sample(range(10), 6))  # the other four kills come while the queue starts
    while len(kills) < 10:
        offset = events.stat().st_size if events.exists() else 0
        saved = _state_step(folder / "queue_state" / "job.json" / "state")
        proc = subprocess.Popen([sys.executable, MAIN, "--multi_run_path", str(folder)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=_env())
        # Kill while the queue starts (checks, the job's start-up), or once a step after the saved state is done;
        # never within the last LEFT steps, so that the job cannot end before the kill.
        target = saved + 1 + rng.randrange(3) if len(kills) in during_training and saved + 3 < STEPS - LEFT else 0
        deadline, waited = time.monotonic() + 300, rng.uniform(0, 3)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() < deadline:
            new = _events_after(events, offset)
            if target == 0 and (time.monotonic() - started > waited or "start" in new):
                break
            if target and max(new.get("step", [0])) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # between steps, or while a state is being written
        assert proc.poll() is None, f"the queue ended before kill {len(kills) + 1} (KILL_SEED={seed}, {kills})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((target, max(_events_after(events, offset).get("step", [0]))))
        deadline = time.monotonic() + 10
        while _jobs_of(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _jobs_of(folder), "the job process outlived the killed queue"

    done = _run(folder)
    assert done.returncode == 0, f"KILL_SEED={seed} kills={kills}\n" + done.stdout[-3000:] + done.stderr[-3000:]
    _same_tensors(tmp_path / "killed-out" / "night.safetensors", tmp_path / "reference-out" / "night.safetensors")

    # the log kept everything, with timestamps, across every resume
    log = (folder / "complete" / "job.log").read_text(encoding="utf-8").splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log)
    assert "=== queue: job.json started ===" in log[0]
    resumed = [line for line in log if "resuming job.json from its state at step" in line]
    assert resumed, f"never resumed from a state (KILL_SEED={seed}, kills={kills})"
    assert "resuming job.json from its state at step" in done.stdout
    assert not (folder / "queue_state").exists() and not list((tmp_path / "killed-out").glob(".*"))
    summary = json.loads((folder / "queue_summary.json").read_text(encoding="utf-8"))
    assert [(j["name"], j["result"]) for j in summary["jobs"]] == [("job.json", "complete")]


@pytest.mark.slow
def test_out_of_memory_at_a_step_is_retried_with_gradient_checkpointing(tmp_path, tiny_sd1_diffusers):
    data = _dataset(tmp_path)
    folder = _queue(tmp_path, "oom", tiny_sd1_diffusers, data, max_steps=4)
    done = _run(folder, LETS_TEST_OOM_AT_STEP="3")
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "job.json ran out of GPU memory; retrying once with gradient_checkpointing on, from its state at step 2" in text
    summary = json.loads((folder / "queue_summary.json").read_text(encoding="utf-8"))
    assert summary["jobs"][0]["result"] == "complete" and summary["jobs"][0]["retried"] == "gradient_checkpointing on"
    log = (folder / "complete" / "job.log").read_text(encoding="utf-8")
    assert "error: out of GPU memory: CUDA out of memory (test hook LETS_TEST_OOM_AT_STEP=3)" in log
    settings = json.loads((tmp_path / "oom-out" / "night_settings.json").read_text(encoding="utf-8"))
    assert settings["gradient_checkpointing"] is True
    status = json.loads((folder / "queue_status.json").read_text(encoding="utf-8"))
    job = status["jobs"][0]
    assert (job["state"], job["step"], job["total_steps"], job["retried"]) == ("complete", 4, 4, "gradient_checkpointing on")
    assert status["curve"]["step"] == [1, 2, 3, 4]  # the retry's steps replace the first attempt's after its state
    assert job["last_saved"] == str(tmp_path / "oom-out" / "night.safetensors")
