"""The queue's status pieces on their own: a job's status line from its events, the curve, the ETA,
the progress-events file, the timestamped log, and the status file of a single training."""

from __future__ import annotations

import json
import math
import os
import re

from frontend.queue_child import JobLog
from frontend.queue_status import (
    CURVE_POINTS,
    EventReader,
    EventWriter,
    JobTracker,
    RunStatusCallbacks,
    queue_eta,
    status_path_for_run,
)


def test_a_jobs_line_follows_its_events_and_a_resume_cuts_the_curve(tmp_path):
    job = JobTracker(name="a.json", state="running", ignore_saves=(str(tmp_path / "queue_state"),))
    job.apply({"event": "start", "time": 100.0, "total_steps": 10, "start_step": 0})
    for step in range(1, 6):
        job.apply({"event": "step", "time": 100.0 + step, "step": step, "total_steps": 10, "loss": step / 10,
                   "lr": 1e-4, "epoch": 1})
    assert (job.step, job.loss, job.it_per_s, job.eta_seconds) == (5, 0.5, 1.0, 5.0)
    job.apply({"event": "saved", "time": 106.0, "path": str(tmp_path / "out" / "a-step00000005.safetensors")})
    job.apply({"event": "saved", "time": 106.0, "path": str(tmp_path / "queue_state" / "state")})  # the queue's own
    assert job.last_saved == str(tmp_path / "out" / "a-step00000005.safetensors")
    job.apply({"event": "samples", "time": 106.0, "paths": ["s1.png", "s2.png"]})
    assert job.samples == [os.path.abspath("s1.png"), os.path.abspath("s2.png")]
    # killed after step 5, resumed from its state at step 3: steps 4 and 5 are trained again
    job.apply({"event": "start", "time": 200.0, "total_steps": 10, "start_step": 3})
    assert job.curve()["step"] == [1, 2, 3] and job.it_per_s == 1.0  # the old speed until a new one is measured
    job.apply({"event": "step", "time": 202.0, "step": 4, "total_steps": 10, "loss": None, "lr": 1e-4, "epoch": 1})
    job.apply({"event": "step", "time": 203.0, "step": 5, "total_steps": 10, "loss": 0.7, "lr": 1e-4, "epoch": 1})
    assert job.curve() == {"step": [1, 2, 3, 4, 5], "loss": [0.1, 0.2, 0.3, None, 0.7], "lr": [1e-4] * 5}
    line = job.to_dict()
    assert set(line) == {"name", "state", "step", "total_steps", "epoch", "loss", "lr", "it_per_s", "eta_seconds",
                         "output_dir", "output_name", "last_saved", "samples", "log", "seconds", "retried", "reason"}


def test_the_curve_keeps_at_most_500_points_as_means_of_equal_runs():
    job = JobTracker(name="a.json")
    for step in range(1, 2001):
        job.apply({"event": "step", "time": float(step), "step": step, "loss": float(step), "lr": 1.0})
    curve = job.curve()
    assert len(curve["step"]) == CURVE_POINTS
    assert curve["step"][0] == 4 and curve["loss"][0] == 2.5 and curve["step"][-1] == 2000
    assert curve["loss"][-1] == 1998.5


def test_queue_eta_from_the_running_jobs_speed_and_the_waiting_jobs_steps():
    running = JobTracker(name="a", state="running", step=50, total_steps=100, it_per_s=2.0, cost=1.0)
    waiting = [JobTracker(name="b", total_steps=100, cost=1.0), JobTracker(name="c", total_steps=10, cost=4.0)]
    assert queue_eta(running, waiting, seconds_per_cost=0.5) == 25 + 50 + 20
    assert queue_eta(running, waiting, seconds_per_cost=None) is None
    assert queue_eta(None, [JobTracker(name="d", cost=1.0)], 0.5) is None  # steps unknown


def test_events_written_by_one_process_are_read_line_by_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    writer = EventWriter(str(path))
    reader = EventReader(str(path))
    assert reader.read() == []
    writer.write("step", step=1, loss=math.nan)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"event": "step", "st')  # a line cut short (a kill), then the next run's lines
    assert [e["step"] for e in reader.read()] == [1] and reader.read() == []
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n")
    writer.write("end", output=None)
    events = reader.read()
    assert [e["event"] for e in events] == ["end"]
    writer.close()
    assert json.loads(path.read_text().splitlines()[0])["loss"] is None


def test_the_log_stamps_every_line_and_thins_progress_bar_redraws(tmp_path):
    log = JobLog(str(tmp_path / "job.log"))
    log.note("=== queue: job started ===")
    log.feed(b"loading model\nsteps:  10%|#  | 1/10\rsteps:  20%|## | 2/10\rsteps:  30%")
    log.feed(b"|### | 3/10\rsteps: 100%|####| 10/10\nsaved x.safetensors\npartial")
    assert log.tail_lines() == ["=== queue: job started ===", "loading model", "steps: 100%|####| 10/10",
                                "saved x.safetensors"]
    log.close()
    lines = (tmp_path / "job.log").read_text(encoding="utf-8").splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    texts = [line[20:] for line in lines]
    assert texts == ["=== queue: job started ===", "loading model", "steps:  10%|#  | 1/10",
                     "steps: 100%|####| 10/10", "saved x.safetensors", "partial"]
    again = JobLog(str(tmp_path / "job.log"))  # a resumed job appends
    again.note("resumed")
    again.close()
    assert len((tmp_path / "job.log").read_text(encoding="utf-8").splitlines()) == len(lines) + 1


def test_the_log_tail_shows_the_bar_once_at_its_latest_state(tmp_path):
    log = JobLog(str(tmp_path / "job.log"), tail=3)
    log.feed(b"one\ntwo\rtwo and a half\rthree\n")
    assert log.tail_lines() == ["one", "three"]
    log.feed(b"bar 1\rbar 2\r")
    assert log.tail_lines() == ["one", "three", "bar 2"]
    log.close()


def test_a_single_training_keeps_its_own_status_file(tmp_path):
    class Console:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *args: self.calls.append(name)

    console = Console()
    status = RunStatusCallbacks(console, str(tmp_path), "mylora")
    path = tmp_path / "mylora_status.json"
    assert status_path_for_run(str(tmp_path), "mylora") == str(path)
    status.finish("failed", "preflight found a problem")  # before training started: no file
    assert not path.exists()
    status.on_start({"max_train_steps": 3, "start_step": 0})
    status.on_progress(1, 3, 0.5, 1e-4, 1)
    status.on_save(str(tmp_path / "mylora-step00000001.safetensors"))
    status.on_sample([str(tmp_path / "sample" / "a.png")])
    status.on_message("hello")
    assert console.calls == ["on_start", "on_progress", "on_save", "on_sample", "on_message"]
    running = json.loads(path.read_text(encoding="utf-8"))
    assert running["state"] == "running" and running["folder"] == str(tmp_path)
    assert running["jobs"][0]["samples"] == [str(tmp_path / "sample" / "a.png")]
    status.on_progress(3, 3, 0.25, 1e-4, 1)
    status.finish("complete")
    done = json.loads(path.read_text(encoding="utf-8"))
    assert done["state"] == "finished" and len(done["jobs"]) == 1
    job = done["jobs"][0]
    assert (job["name"], job["state"], job["step"], job["total_steps"], job["loss"]) == ("mylora", "complete", 3, 3, 0.25)
    assert job["last_saved"] == str(tmp_path / "mylora-step00000001.safetensors") and job["seconds"] >= 0
    assert done["curve"] == {"job": "mylora", "step": [1, 3], "loss": [0.5, 0.25], "lr": [1e-4, 1e-4]}
