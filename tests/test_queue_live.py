"""The overnight queue with a stand-in job program: the live folder, the lock, output clashes, the page's
requests, the status and summary files, the out-of-memory retry and bad input.

The stand-in (FAKE_JOB) is a real child process started by the real queue; what it does is written
in its job's ``training_comment`` (a JSON text), so each test drives the queue from inside a job:
edit the folder while a job runs, wait until the status file shows a step, end out of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from frontend.job_queue import list_jobs, run_queue
from frontend.queue_control import read_control, request_stop_after_current, write_control, QueueControl
from frontend.queue_lock import LOCK_FILE, QueueLock, QueueLockedError
from sd_scripts.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_JOB = r'''
import json, os, sys, time
from frontend.queue_status import EventWriter
settings_path, result_path = sys.argv[1:3]
s = json.load(open(settings_path, encoding="utf-8"))
plan = json.loads(s.get("training_comment") or "{}")
name = s["change_output_name"]
queue = os.environ["FAKE_QUEUE"]
attempt = os.environ.get("LETS_QUEUE_ATTEMPT")
with open(os.path.join(os.environ["FAKE_RECORD"], "order.txt"), "a") as f:
    f.write(f"{name} {attempt}\n")
with open(os.path.join(os.environ["FAKE_RECORD"], f"{name}-{attempt}.json"), "w") as f:
    json.dump(s, f)
print(f"training {name}", flush=True)
events = EventWriter(os.environ["LETS_QUEUE_EVENTS"])
total = plan.get("steps", 3)
events.write("start", total_steps=total, start_step=0)
for step in range(1, total + 1):
    events.write("step", step=step, total_steps=total, loss=1.0 / step, lr=1e-4, epoch=1)
    time.sleep(0.05)
for op, *args in plan.get("do", []):
    path = os.path.join(queue, args[0]) if args else None
    if op == "write":
        with open(path, "w") as f:
            f.write(args[1])
    elif op == "remove":
        os.remove(path)
    elif op == "rename":
        os.rename(path, os.path.join(queue, args[1]))
    elif op == "stop":
        from frontend.queue_control import request_stop_after_current
        request_stop_after_current(queue)
    elif op == "unstop":  # the page's button pressed again
        from frontend.queue_control import set_stop_after_current
        deadline = time.time() + 30
        while time.time() < deadline:  # until the queue shows it is stopping
            try:
                if json.load(open(os.path.join(queue, "queue_status.json")))["state"] == "stopping":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        set_stop_after_current(queue, False)
    elif op == "wait_status":  # until the queue's status file shows this job at this step
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                status = json.load(open(os.path.join(queue, "queue_status.json")))
                job = [j for j in status["jobs"] if j["state"] == "running"][0]
                if job["step"] == int(args[1]):
                    with open(os.path.join(os.environ["FAKE_RECORD"], "seen_status.json"), "w") as f:
                        json.dump(status, f)
                    break
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.05)
if plan.get("oom") == "always" or (plan.get("oom") == "first" and attempt == "1"):
    print("error: out of GPU memory: CUDA out of memory", flush=True)
    sys.exit(3)
if plan.get("exit"):
    sys.exit(plan["exit"])
os.makedirs(s["output_folder"], exist_ok=True)
out = os.path.join(s["output_folder"], name + ".safetensors")
open(out, "wb").close()
events.write("saved", path=out)
events.write("end", output=out)
json.dump({"output_path": out}, open(result_path, "w"))
'''


@pytest.fixture
def queue(tmp_path, monkeypatch):
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB, encoding="utf-8")
    record = tmp_path / "record"
    record.mkdir()
    folder = tmp_path / "queue"
    folder.mkdir()
    (tmp_path / "data" / "5_x").mkdir(parents=True)
    monkeypatch.setenv("FAKE_RECORD", str(record))
    monkeypatch.setenv("FAKE_QUEUE", str(folder))

    def command(settings_path, result_path):
        return [sys.executable, str(script), settings_path, result_path]

    def run(**kwargs):
        said: list[str] = []
        code = run_queue(str(folder), kwargs.pop("cli", {}), command=command, check_engine=False, echo=False,
                         say=said.append, **kwargs)
        return code, "\n".join(said)

    def order() -> list[str]:
        path = record / "order.txt"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    return folder, run, order, record


def job_text(folder, name, plan=None, **settings) -> str:
    base = {"base_model": "someone/model", "img_folder": str(folder.parent / "data"),
            "output_folder": str(folder.parent / "out"), "change_output_name": os.path.splitext(name)[0],
            "test_seed": 1}
    if plan is not None:
        base["training_comment"] = json.dumps(plan)
    base.update(settings)
    return json.dumps(base)


def add_job(folder, name, plan=None, **settings):
    (folder / name).write_text(job_text(folder, name, plan, **settings), encoding="utf-8")


# ------------------------------------------------------------------------------------------ live folder
def test_the_folder_is_read_again_between_jobs(queue):
    folder, run, order, record = queue
    edited = job_text(folder, "4_edit.json", net_dim=64)
    add_job(folder, "1_a.json", {"do": [["write", "2_new.json", job_text(folder, "2_new.json")],
                                        ["remove", "3_gone.json"],
                                        ["write", "4_edit.json", edited],
                                        ["rename", "9_late.json", "1_b_renamed.json"]]})
    add_job(folder, "3_gone.json")
    add_job(folder, "4_edit.json", net_dim=8)
    add_job(folder, "9_late.json", change_output_name="renamed_first")
    code, said = run()
    assert code == 0, said
    assert order() == ["1_a 1", "renamed_first 1", "2_new 1", "4_edit 1"]
    assert json.loads((record / "4_edit-1.json").read_text())["net_dim"] == 64  # edited before its turn
    assert "new job 2_new.json; checking it" in said and "4_edit.json was edited; checking it again" in said
    assert "3_gone.json is no longer in the folder; dropped" in said
    assert sorted(os.listdir(folder / "complete")) == sorted(
        ["1_a.json", "1_a.log", "1_b_renamed.json", "1_b_renamed.log", "2_new.json", "2_new.log", "4_edit.json",
         "4_edit.log"])
    summary = json.loads((folder / "queue_summary.json").read_text())
    assert [(j["name"], j["result"]) for j in summary["jobs"]] == [
        ("1_a.json", "complete"), ("1_b_renamed.json", "complete"), ("2_new.json", "complete"),
        ("4_edit.json", "complete")]


def test_a_job_edited_into_a_broken_one_fails_before_it_starts(queue):
    folder, run, order, _ = queue
    add_job(folder, "1_a.json", {"do": [["write", "2_b.json", job_text(folder, "2_b.json", net_dim=0)]]})
    add_job(folder, "2_b.json")
    add_job(folder, "3_c.json")
    code, said = run()
    assert code == 1
    assert order() == ["1_a 1", "3_c 1"]
    assert "2_b.json: net_dim: must be 1 or more" in said
    assert sorted(os.listdir(folder / "failed")) == ["2_b.json", "2_b.log"]


def test_the_queues_own_files_are_never_jobs(tmp_path):
    for name in ("queue_status.json", "queue_control.json", "queue_summary.json", "Queue_Summary.JSON", "a.json"):
        (tmp_path / name).write_text("{}", encoding="utf-8")
    (tmp_path / "queue_state").mkdir()
    (tmp_path / "queue_state" / "b.json").mkdir()
    (tmp_path / LOCK_FILE).write_text("", encoding="utf-8")
    assert [os.path.basename(p) for p in list_jobs(str(tmp_path))] == ["a.json"]


# ------------------------------------------------------------------------------------------ lock
_HOLD_LOCK = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from frontend.queue_lock import QueueLock
with QueueLock(sys.argv[2]):
    print("holding", flush=True)
    time.sleep(60)
'''


def test_a_second_queue_on_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    folder = tmp_path / "queue"
    folder.mkdir()
    (folder / "a.json").write_text("{}", encoding="utf-8")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, ROOT, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(QueueLockedError, match=f"already being run by another queue \\(process {holder.pid} "):
            QueueLock(str(folder)).acquire()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--multi_run_path", str(folder)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"process {holder.pid}" in lines[0] and lines[0].startswith("error: multi_run_folder")
        assert sorted(os.listdir(folder)) == ["a.json", LOCK_FILE]  # nothing else written, nothing moved
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead (killed, as by a power cut): its lock file remains and is taken over
    assert str(holder.pid) in (folder / LOCK_FILE).read_text()
    with QueueLock(str(folder)) as lock:
        assert str(os.getpid()) in (folder / LOCK_FILE).read_text()
        assert lock.path == str(folder / LOCK_FILE)
    assert not (folder / LOCK_FILE).exists()  # a queue that ends removes its lock


# ------------------------------------------------------------------------------------------ output clashes
def test_output_clashes_are_caught_before_the_first_job_and_nothing_is_overwritten(queue, tmp_path):
    folder, run, order, _ = queue
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_bytes(b"precious")
    (out / "old2-step00000100.safetensors").write_bytes(b"precious too")
    add_job(folder, "1_a.json", change_output_name="same")
    add_job(folder, "2_b.json", change_output_name="Same")
    add_job(folder, "3_c.json", change_output_name="old")
    add_job(folder, "4_d.json", change_output_name="old2")
    add_job(folder, "5_e.json", change_output_name="same", output_folder=str(tmp_path / "elsewhere"))
    code, said = run()
    assert code == 1
    assert order() == ["same 1", "same 1"]  # 1_a and 5_e (another folder)
    before_first = said[:said.index("=== job 1/")]
    assert ("2_b.json: change_output_name: 2_b.json and 1_a.json both write 'Same' into " + str(out)) in before_first
    assert "give one of them another change_output_name (or output_folder)" in before_first
    assert f"3_c.json: change_output_name: 3_c.json would overwrite {out / 'old.safetensors'}" in before_first
    assert f"4_d.json: change_output_name: 4_d.json would overwrite {out / 'old2-step00000100.safetensors'}" in said
    assert (out / "old.safetensors").read_bytes() == b"precious"
    assert sorted(os.listdir(folder / "failed")) == ["2_b.json", "2_b.log", "3_c.json", "3_c.log", "4_d.json",
                                                     "4_d.log"]


def test_a_job_added_later_may_not_overwrite_a_finished_jobs_output(queue):
    folder, run, order, _ = queue
    add_job(folder, "1_a.json", {"do": [["write", "2_b.json", job_text(folder, "2_b.json", change_output_name="1_a")]]})
    code, said = run()
    assert code == 1
    assert order() == ["1_a 1"]
    assert "2_b.json: change_output_name: 2_b.json would overwrite" in said and "1_a.safetensors" in said


# ------------------------------------------------------------------------------------------ page requests
def test_stop_after_current_and_order_from_the_control_file(queue):
    folder, run, order, _ = queue
    write_control(str(folder), QueueControl(stop_after_current=True, order=[]))  # left by an earlier run: ignored
    add_job(folder, "1_a.json")
    add_job(folder, "2_b.json", {"do": [["stop"]]})
    add_job(folder, "3_c.json")
    add_job(folder, "4_d.json")
    code, said = run()
    # first run: 1_a, then 2_b asks to stop after itself
    assert code == 130, said
    assert order() == ["1_a 1", "2_b 1"]
    status = json.loads((folder / "queue_status.json").read_text())
    assert status["state"] == "finished"
    assert [(j["name"], j["state"]) for j in status["jobs"]] == [
        ("1_a.json", "complete"), ("2_b.json", "complete"), ("3_c.json", "waiting"), ("4_d.json", "waiting")]
    assert not read_control(str(folder)).stop_after_current  # done: the request is cleared
    write_control(str(folder), QueueControl(order=["4_d.json"]))
    code, said = run()
    assert code == 0, said
    assert order()[2:] == ["4_d 1", "3_c 1"]


def test_a_stop_request_taken_back_lets_the_queue_go_on(queue):
    folder, run, order, _ = queue
    add_job(folder, "1_a.json", {"do": [["stop"], ["unstop"]]})
    add_job(folder, "2_b.json")
    code, said = run()
    assert code == 0, said
    assert order() == ["1_a 1", "2_b 1"]
    assert "the stop request was taken back; the queue goes on" in said


# ------------------------------------------------------------------------------------------ status, summary
def test_status_file_while_running_and_the_summary_files(queue, tmp_path):
    folder, run, order, record = queue
    add_job(folder, "1_a.json", {"steps": 4, "do": [["wait_status", "1_a.json", 4]]})
    add_job(folder, "2_b.json", {"exit": 1}, max_steps=3)
    add_job(folder, "3_c.json", {"steps": 2}, batch_size=2, max_steps=2)
    code, said = run()
    assert code == 1
    seen = json.loads((record / "seen_status.json").read_text())  # as the job saw it while it ran
    assert seen["version"] == 1 and seen["state"] == "running" and seen["pid"] == os.getpid()
    assert seen["folder"] == str(folder)
    running = seen["jobs"][0]
    assert (running["name"], running["state"], running["step"], running["total_steps"]) == ("1_a.json", "running", 4, 4)
    assert running["loss"] == 0.25 and running["lr"] == 1e-4 and running["it_per_s"] > 0
    assert running["eta_seconds"] == 0 and running["log"] == str(folder / "1_a.log")
    assert running["output_dir"] == str(tmp_path / "out") and running["output_name"] == "1_a"
    assert [(j["name"], j["state"]) for j in seen["jobs"][1:]] == [("2_b.json", "waiting"), ("3_c.json", "waiting")]
    assert seen["curve"] == {"job": "1_a.json", "step": [1, 2, 3, 4], "loss": [1.0, 0.5, 1 / 3, 0.25],
                             "lr": [1e-4] * 4}
    assert "training 1_a" in seen["log_tail"][-1]
    assert seen["eta_seconds"] is not None  # from 1_a's speed, scaled to 3_c's two images a step
    final = json.loads((folder / "queue_status.json").read_text())
    assert final["state"] == "finished" and final["eta_seconds"] is None
    assert [(j["name"], j["state"]) for j in final["jobs"]] == [
        ("1_a.json", "complete"), ("2_b.json", "failed"), ("3_c.json", "complete")]
    assert final["jobs"][0]["last_saved"] == str(tmp_path / "out" / "1_a.safetensors")
    assert final["jobs"][0]["log"] == str(folder / "complete" / "1_a.log")
    summary = json.loads((folder / "queue_summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["folder"] == str(folder)
    rows = {j["name"]: j for j in summary["jobs"]}
    assert rows["1_a.json"]["result"] == "complete" and rows["1_a.json"]["output"] == str(tmp_path / "out" / "1_a.safetensors")
    assert rows["2_b.json"]["result"] == "failed" and rows["2_b.json"]["reason"] == "exit code 1; see failed/2_b.log"
    text = (folder / "queue_summary.txt").read_text()
    assert text.splitlines()[0].split()[:4] == ["job", "result", "time", "output"] and "2_b.json  failed" in text
    log = (folder / "complete" / "1_a.log").read_text().splitlines()
    assert all(line[:4].isdigit() and line[10] == " " and line[13] == ":" for line in log)  # timestamps
    assert "=== queue: 1_a.json started ===" in log[0] and "training 1_a" in log[1]


# ------------------------------------------------------------------------------------------ out of memory
def test_out_of_memory_is_retried_once_with_a_memory_saver(queue):
    folder, run, order, record = queue
    add_job(folder, "1_a.json", {"oom": "first"})
    add_job(folder, "2_b.json", {"oom": "first"}, gradient_checkpointing=True, cache_latents=True,
            cache_text_encoder_outputs=True, batch_size=4, gradient_acc_steps=3)
    add_job(folder, "3_c.json", {"oom": "always"})
    add_job(folder, "4_d.json", {"exit": 1})
    code, said = run()
    assert code == 1
    assert order() == ["1_a 1", "1_a 2", "2_b 1", "2_b 2", "3_c 1", "3_c 2", "4_d 1"]  # 4_d: another error
    retry = json.loads((record / "1_a-2.json").read_text())
    assert retry["gradient_checkpointing"] is True and retry["test_seed"] == 1
    b = json.loads((record / "2_b-2.json").read_text())
    assert (b["batch_size"], b["gradient_acc_steps"]) == (2, 6)
    summary = {j["name"]: j for j in json.loads((folder / "queue_summary.json").read_text())["jobs"]}
    assert summary["1_a.json"]["result"] == "complete" and summary["1_a.json"]["retried"] == "gradient_checkpointing on"
    assert summary["2_b.json"]["retried"] == "batch_size 4 -> 2 with gradient_acc_steps 3 -> 6 (the same effective batch)"
    assert summary["3_c.json"]["result"] == "failed" and summary["3_c.json"]["reason"].startswith("out of GPU memory again")
    assert summary["4_d.json"]["retried"] is None
    assert "retried after running out of memory with gradient_checkpointing on" in (folder / "queue_summary.txt").read_text()
    assert "1_a.json ran out of GPU memory; retrying once with gradient_checkpointing on, from the start" in said


def test_memory_savers_in_order_as_far_as_needed():
    from ArgsList import ArgStore
    from frontend.queue_retry import memory_retry

    store = ArgStore()
    every = lambda s: True  # noqa: E731
    assert memory_retry(store.replace(gradient_checkpointing=False), every).change == "gradient_checkpointing on"
    saved = memory_retry(store.replace(gradient_checkpointing=True, cache_latents=False), every)
    assert saved.change == "cache_latents and cache_text_encoder_outputs on" and saved.keeps_batches
    no_te_cache = lambda s: not s.cache_text_encoder_outputs  # noqa: E731 - e.g. the text encoder is trained
    saved = memory_retry(store.replace(gradient_checkpointing=True, cache_latents=False), no_te_cache)
    assert saved.change == "cache_latents on" and not saved.store.cache_text_encoder_outputs
    on = store.replace(gradient_checkpointing=True, cache_latents=True, cache_text_encoder_outputs=True)
    halved = memory_retry(on.replace(batch_size=6, gradient_acc_steps=None), every)
    assert (halved.store.batch_size, halved.store.gradient_acc_steps, halved.keeps_batches) == (3, 2, False)
    assert memory_retry(on.replace(batch_size=3), every).store.batch_size == 1
    assert memory_retry(on.replace(batch_size=1), every) is None


# ------------------------------------------------------------------------------------------ bad input
def test_bad_queue_folders_and_files_that_are_not_jobs(queue, tmp_path):
    folder, run, order, _ = queue
    with pytest.raises(ConfigError, match="multi_run_folder: folder not found"):
        run_queue(str(tmp_path / "nope"), check_engine=False)
    (tmp_path / "file.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="is a file, not a folder; give the folder that holds"):
        run_queue(str(tmp_path / "file.json"), check_engine=False)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--multi_run_path", str(tmp_path / "file.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    add_job(folder, "1_a.json")
    (folder / "2_list.json").write_text("[1, 2]", encoding="utf-8")
    (folder / "3_other.json").write_text('{"images": ["a.png"], "version": 3}', encoding="utf-8")
    (folder / "4_broken.json").write_text('{"net_dim": 8,', encoding="utf-8")
    code, said = run()
    assert code == 1
    assert order() == ["1_a 1"]
    assert "2_list.json: not a training job (it holds a list); move it out of the queue folder" in said
    assert "3_other.json: not a training job (none of its keys is a training setting)" in said
    assert "4_broken.json: not valid JSON at line 1" in said
    assert (folder / "failed" / "3_other.json").read_text() == '{"images": ["a.png"], "version": 3}'  # kept as it was
