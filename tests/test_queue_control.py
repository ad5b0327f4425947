"""queue_control.json: the requests the status page makes to a running queue."""

from __future__ import annotations

import json
import os

import pytest

from frontend.queue_control import (
    CONTROL_FILE,
    ControlError,
    QueueControl,
    move_job,
    ordered,
    read_control,
    request_stop_after_current,
    set_stop_after_current,
    waiting_jobs,
)


def write_status(folder, states: dict[str, str]) -> None:
    jobs = [{"name": name, "state": state} for name, state in states.items()]
    status = {"version": 1, "folder": str(folder), "state": "running", "jobs": jobs}
    (folder / "queue_status.json").write_text(json.dumps(status), encoding="utf-8")


def test_missing_or_broken_file_reads_as_no_requests(tmp_path):
    assert read_control(str(tmp_path)) == QueueControl(False, [])
    (tmp_path / CONTROL_FILE).write_text("{not json", encoding="utf-8")
    assert read_control(str(tmp_path)) == QueueControl(False, [])
    (tmp_path / CONTROL_FILE).write_text('{"stop_after_current": "yes", "order": ["a.json", 3]}', encoding="utf-8")
    assert read_control(str(tmp_path)) == QueueControl(False, ["a.json"])


def test_stop_after_current_is_stored_and_can_be_taken_back(tmp_path):
    request_stop_after_current(str(tmp_path))
    data = json.loads((tmp_path / CONTROL_FILE).read_text(encoding="utf-8"))
    assert data == {"version": 1, "stop_after_current": True, "order": []}
    assert read_control(str(tmp_path)).stop_after_current
    set_stop_after_current(str(tmp_path), False)
    assert not read_control(str(tmp_path)).stop_after_current
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_move_job_reorders_only_waiting_jobs(tmp_path):
    folder = str(tmp_path)
    write_status(tmp_path, {"a.json": "complete", "b.json": "running", "c.json": "waiting",
                            "d.json": "waiting", "e.json": "waiting"})
    assert waiting_jobs(folder) == ["c.json", "d.json", "e.json"]
    assert move_job(folder, "e.json", -1).order == ["c.json", "e.json", "d.json"]
    assert move_job(folder, "e.json", -1).order == ["e.json", "c.json", "d.json"]
    assert move_job(folder, "e.json", -1).order == ["e.json", "c.json", "d.json"]  # already first
    assert move_job(folder, "c.json", 5).order == ["e.json", "d.json", "c.json"]
    assert waiting_jobs(folder) == ["e.json", "d.json", "c.json"]
    request_stop_after_current(folder)
    assert read_control(folder) == QueueControl(True, ["e.json", "d.json", "c.json"])
    for name in ("b.json", "a.json", "missing.json"):
        with pytest.raises(ControlError, match=f"{name} is not waiting"):
            move_job(folder, name, 1)


def test_ordered_puts_requested_jobs_first_and_keeps_new_ones_in_name_order():
    control = QueueControl(order=["c.json", "gone.json", "a.json", "c.json"])
    assert ordered(["a.json", "b.json", "c.json", "new.json"], control) == ["c.json", "a.json", "b.json", "new.json"]
    assert ordered(["a.json", "b.json"], QueueControl()) == ["a.json", "b.json"]
