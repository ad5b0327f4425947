"""Requests to a running queue from outside it: stop after the current job, run the waiting jobs in another order.

The status page (or anything else) writes ``<queue folder>/queue_control.json``; the queue reads it
between jobs. The file holds::

    {"version": 1, "stop_after_current": false, "order": ["job3.json", "job2.json"]}

``order`` lists waiting jobs' file names in the order the user asked for. :func:`ordered` applies it
to the names the queue finds in its folder: the listed ones that still exist come first, in the
listed order, and every other job follows in its own (name) order. The file is always replaced
atomically, so the queue never reads half of it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field

from .json_io import write_json_atomic

__all__ = [
    "CONTROL_FILE",
    "STATUS_FILE",
    "QueueControl",
    "ControlError",
    "read_control",
    "write_control",
    "request_stop_after_current",
    "set_stop_after_current",
    "move_job",
    "ordered",
    "waiting_jobs",
    "training_status_path",
]

CONTROL_FILE = "queue_control.json"
STATUS_FILE = "queue_status.json"
VERSION = 1


def training_status_path(output_folder: str, output_name: str) -> str:
    """Where a single training (no queue) keeps its status file: ``<output folder>/<output name>_status.json``."""
    return os.path.join(output_folder, f"{output_name}_status.json")

# One writer at a time inside this process (the status page serves requests on several threads).
_WRITE_LOCK = threading.Lock()


class ControlError(ValueError):
    """A request the queue cannot follow (a job that is not waiting); the message is one line for the user."""


@dataclass
class QueueControl:
    stop_after_current: bool = False
    order: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"version": VERSION, "stop_after_current": self.stop_after_current, "order": list(self.order)}


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_control(folder: str) -> QueueControl:
    """The requests for the queue in ``folder``; none (the defaults) when the file is missing or unreadable."""
    data = _read_json(os.path.join(folder, CONTROL_FILE)) or {}
    order = data.get("order")
    return QueueControl(
        stop_after_current=data.get("stop_after_current") is True,
        order=[name for name in order if isinstance(name, str)] if isinstance(order, list) else [],
    )


def write_control(folder: str, control: QueueControl) -> None:
    write_json_atomic(os.path.join(folder, CONTROL_FILE), control.to_dict())


def set_stop_after_current(folder: str, value: bool = True) -> QueueControl:
    """Ask the queue to stop (or, with False, no longer stop) once the running job ends."""
    with _WRITE_LOCK:
        control = read_control(folder)
        control.stop_after_current = bool(value)
        write_control(folder, control)
        return control


def request_stop_after_current(folder: str) -> QueueControl:
    return set_stop_after_current(folder, True)


def waiting_jobs(folder: str) -> list[str]:
    """The names of the waiting jobs, in the order the queue will run them (from its status file)."""
    status = _read_json(os.path.join(folder, STATUS_FILE)) or {}
    jobs = status.get("jobs") if isinstance(status.get("jobs"), list) else []
    names = [job.get("name") for job in jobs if isinstance(job, dict) and job.get("state") == "waiting"]
    return ordered([name for name in names if isinstance(name, str)], read_control(folder))


def move_job(folder: str, name: str, delta: int) -> QueueControl:
    """Move waiting job ``name`` by ``delta`` places (-1 earlier, +1 later) among the waiting jobs."""
    with _WRITE_LOCK:
        waiting = waiting_jobs(folder)
        if name not in waiting:
            raise ControlError(f"{name} is not waiting in the queue, so it cannot be moved")
        index = waiting.index(name)
        target = max(0, min(len(waiting) - 1, index + int(delta)))
        waiting.insert(target, waiting.pop(index))
        control = read_control(folder)
        control.order = waiting
        write_control(folder, control)
        return control


def ordered(names: list[str], control: QueueControl) -> list[str]:
    """``names`` (job file names in the queue's own order) with the user's requested order applied."""
    present = set(names)
    first = [name for name in dict.fromkeys(control.order) if name in present]
    chosen = set(first)
    return first + [name for name in names if name not in chosen]
