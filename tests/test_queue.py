"""The training queue: order, checks before the first job, one process per job, complete/ and failed/, Ctrl+C.

Most tests run the queue with a small stand-in job program (the queue is what they test); the
last one runs real tiny trainings through the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from frontend.job_queue import list_jobs, run_queue
from sd_scripts.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_JOB = r'''
import json, os, sys, time
settings_path, result_path = sys.argv[1:3]
s = json.load(open(settings_path, encoding="utf-8"))
name = s["change_output_name"]
print(f"training {name} net_dim={s['net_dim']} alpha={s['alpha']} clip_skip={s['clip_skip']}", flush=True)
with open(os.path.join(os.environ["FAKE_RECORD"], name + ".json"), "w") as f:
    json.dump(s, f)
if "crash" in name:
    print("Traceback (most recent call last):\nRuntimeError: CUDA out of memory", flush=True)
    sys.exit(1)
time.sleep(float(s.get("training_comment") or 0))
os.makedirs(s["output_folder"], exist_ok=True)
out = os.path.join(s["output_folder"], name + ".safetensors")
open(out, "wb").close()
json.dump({"output_path": out}, open(result_path, "w"))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB, encoding="utf-8")
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("FAKE_RECORD", str(record))
    (tmp_path / "data" / "5_x").mkdir(parents=True)

    def command(settings_path, result_path):
        return [sys.executable, str(script), settings_path, result_path]

    return command, record


def _job(folder, name, **settings):
    base = {"base_model": "someone/model", "img_folder": str(folder.parent / "data"),
            "output_folder": str(folder.parent / "out"), "change_output_name": os.path.splitext(name)[0]}
    base.update(settings)
    path = folder / name
    path.write_text(json.dumps(base), encoding="utf-8")
    return path


def test_jobs_are_every_json_in_name_order(tmp_path):
    queue = tmp_path / "queue"
    (queue / "complete").mkdir(parents=True)
    for name in ("job10.json", "Job2.JSON", "job1.json", ".hidden.json", "._job3.json", "notes.txt",
                 "complete/old.json"):
        (queue / name).write_text("{}", encoding="utf-8")
    assert [os.path.basename(p) for p in list_jobs(str(queue))] == ["job1.json", "Job2.JSON", "job10.json"]


def test_four_jobs_one_crashes_one_has_a_bad_path(tmp_path, fake):
    command, record = fake
    queue = tmp_path / "queue"
    queue.mkdir()
    _job(queue, "1_first.json", net_dim=8)
    _job(queue, "2_crash.json")
    _job(queue, "3_bad.json", img_folder=str(tmp_path / "missing"), net_dim=0)
    _job(queue, "4_last.JSON", alpha=2)
    said = []
    code = run_queue(str(queue), {}, command=command, check_engine=False, echo=False, say=said.append)
    assert code == 1
    # every problem is listed before the first job starts
    first_start = next(i for i, line in enumerate(said) if line.startswith("\n=== job 1/3"))
    problems = [line for line in said[:first_start] if line.startswith("  3_bad.json: ")]
    assert len(problems) == 2 and "img_folder: folder not found" in problems[0] and "net_dim" in problems[1]
    # the other jobs ran, each in its own process, and were sorted out by result
    assert sorted(os.listdir(record)) == ["1_first.json", "2_crash.json", "4_last.json"]
    assert sorted(os.listdir(queue / "complete")) == ["1_first.json", "1_first.log", "4_last.JSON", "4_last.log"]
    assert sorted(os.listdir(queue / "failed")) == ["2_crash.json", "2_crash.log", "3_bad.json", "3_bad.log"]
    assert "CUDA out of memory" in (queue / "failed" / "2_crash.log").read_text(encoding="utf-8")
    assert "folder not found" in (queue / "failed" / "3_bad.log").read_text(encoding="utf-8")
    assert "training 1_first net_dim=8" in (queue / "complete" / "1_first.log").read_text(encoding="utf-8")
    assert sorted(n for n in os.listdir(queue) if os.path.isfile(queue / n)) == [
        "queue_status.json", "queue_summary.json", "queue_summary.txt"]  # the queue's own files (the lock is gone)
    assert (tmp_path / "out" / "4_last.safetensors").exists()
    table = said[-1].strip().splitlines()
    assert table[0].split()[:4] == ["job", "result", "time", "output"]
    rows = {line.split()[0]: line.split()[1] for line in table[2:]}
    assert rows == {"1_first.json": "complete", "2_crash.json": "failed", "3_bad.json": "failed",
                    "4_last.JSON": "complete"}
    assert str(tmp_path / "out" / "1_first.safetensors") in said[-1]


def test_flags_apply_to_every_job_over_its_json(tmp_path, fake):
    command, record = fake
    queue = tmp_path / "queue"
    queue.mkdir()
    _job(queue, "a.json", net_dim=8, alpha=8, json_load_skip_list=["net_dim"])
    _job(queue, "b.json", clip_skip=1)
    assert run_queue(str(queue), {"alpha": 1.5}, command=command, check_engine=False, echo=False,
                     say=lambda text: None) == 0
    a = json.load(open(record / "a.json"))
    b = json.load(open(record / "b.json"))
    assert (a["net_dim"], a["alpha"], a["clip_skip"]) == (8, 1.5, 2)  # a job's JSON is loaded whole
    assert (b["net_dim"], b["alpha"], b["clip_skip"]) == (32, 1.5, 1)
    assert a["img_folder"] == str(tmp_path / "data")


def test_queue_folder_problems(tmp_path):
    with pytest.raises(ConfigError, match="multi_run_folder: folder not found"):
        run_queue(str(tmp_path / "nope"), check_engine=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .json files"):
        run_queue(str(tmp_path / "empty"), check_engine=False)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--multi_run_path", str(tmp_path / "empty")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: multi_run_folder: no .json files")


_RUNNER = r'''
import sys
sys.path.insert(0, sys.argv[1])
from frontend.job_queue import run_queue
command = lambda s, r: [sys.executable, sys.argv[3], s, r]
sys.exit(run_queue(sys.argv[2], {}, command=command, check_engine=False))
'''


def _start_queue(tmp_path, fake_script):
    queue = tmp_path / "queue"
    queue.mkdir()
    for name in ("a.json", "b.json", "c.json"):
        _job(queue, name, training_comment="3")  # each stand-in job takes 3 seconds
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, ROOT, str(queue), str(fake_script)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("training a"):
            break
    return proc, queue, lines


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT")
def test_ctrl_c_stops_after_the_current_job(tmp_path, fake):
    proc, queue, lines = _start_queue(tmp_path, tmp_path / "fake_job.py")
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "stops after the current job" in text
    assert os.listdir(queue / "complete") == ["a.json", "a.log"] or sorted(os.listdir(queue / "complete")) == [
        "a.json", "a.log"]
    assert [os.path.basename(p) for p in list_jobs(str(queue))] == ["b.json", "c.json"]
    assert "not run" in text.splitlines()[-1] or "not run" in text


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT")
def test_second_ctrl_c_stops_now(tmp_path, fake):
    proc, queue, lines = _start_queue(tmp_path, tmp_path / "fake_job.py")
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert time.monotonic() - start < 2.5  # the 3-second job did not run to its end
    assert not (queue / "complete").exists() and not (queue / "failed").exists()
    assert [os.path.basename(p) for p in list_jobs(str(queue))] == ["a.json", "b.json", "c.json"]
    assert "stopped" in text


# ------------------------------------------------------------------------------------------ real trainings
@pytest.mark.slow
def test_queue_of_real_tiny_trainings(tmp_path, tiny_sd1_diffusers):
    from PIL import Image

    data = tmp_path / "data" / "4_shape"
    data.mkdir(parents=True)
    for i, color in enumerate(("red", "blue", "green", "white")):
        Image.new("RGB", (64, 64), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"shape, {color}", encoding="utf-8")
    broken = tmp_path / "broken model"
    shutil.copytree(tiny_sd1_diffusers, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:200])  # configs fine, weights cut short: fails when loading
    queue = tmp_path / "queue"
    queue.mkdir()
    common = {"base_model": str(tiny_sd1_diffusers), "img_folder": str(tmp_path / "data"),
              "output_folder": str(tmp_path / "out"), "tokenizer_cache_dir": str(tiny_sd1_diffusers / "tokenizer"),
              "train_resolution": 64, "min_bucket_resolution": 64, "max_bucket_resolution": 128,
              "bucket_reso_steps": 32, "max_steps": 2, "net_dim": 4, "alpha": 2, "clip_skip": 1,
              "optimizer_type": "AdamW", "mixed_precision": "no", "xformers": False, "cache_latents": True}
    jobs = {"1_small.json": {"change_output_name": "small"},
            "2_broken_model.json": {"change_output_name": "broken", "base_model": str(broken)},
            "3_bad_path.json": {"change_output_name": "bad", "img_folder": str(tmp_path / "no such folder")},
            "4_locon.json": {"change_output_name": "locon", "network_args": {"conv_dim": "2", "conv_alpha": "1"}}}
    for name, changes in jobs.items():
        (queue / name).write_text(json.dumps({**common, **changes}), encoding="utf-8")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--multi_run_path", str(queue)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    text = run.stdout + run.stderr
    assert run.returncode == 1, text[-4000:]
    assert (queue / "complete").is_dir(), text[-6000:]
    assert sorted(os.listdir(queue / "complete")) == ["1_small.json", "1_small.log", "4_locon.json", "4_locon.log"]
    assert sorted(os.listdir(queue / "failed")) == ["2_broken_model.json", "2_broken_model.log", "3_bad_path.json",
                                                    "3_bad_path.log"]
    for name in ("small", "locon"):
        assert (tmp_path / "out" / f"{name}.safetensors").is_file()
        assert (tmp_path / "out" / f"{name}_settings.json").is_file()
        assert (tmp_path / "out" / f"{name}.txt").is_file()
    assert not (tmp_path / "out" / "broken.safetensors").exists()
    assert "img_folder: folder not found" in (queue / "failed" / "3_bad_path.log").read_text(encoding="utf-8")
    assert text.index("3_bad_path.json: img_folder") < text.index("=== job 1/3")
