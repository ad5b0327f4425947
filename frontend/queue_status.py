"""Live status of a queue (or of one training): ``queue_status.json`` and the progress events behind it.

The status file
---------------
``<queue folder>/queue_status.json`` is replaced atomically at most once a second while a job trains
(and at once when a job starts or ends), and once more when the queue ends. For a single training (``main.py`` without a queue) the same
document, with one job, is ``<output_folder>/<output_name>_status.json``
(:func:`status_path_for_run`, ``queue_control.training_status_path``). The status page reads it; nothing else in it is private::

    {"version": 1, "folder": abs path, "pid": int, "state": "running" | "stopping" | "finished",
     "started": unix time, "updated": unix time,
     "eta_seconds": float | null,        # the whole queue: step counts and measured speed
     "jobs": [{"name": "job1.json", "state": "waiting" | "running" | "complete" | "failed" | "stopped",
               "step": int | null, "total_steps": int | null, "epoch": int | null,
               "loss": float | null, "lr": float | null, "it_per_s": float | null, "eta_seconds": float | null,
               "output_dir": abs path | null, "output_name": str | null,
               "last_saved": abs path | null,   # the last LoRA file (or state the job itself asked for)
               "samples": [abs paths of the latest sample images],
               "log": abs path of the job's log | null, "seconds": float | null,
               "retried": str | null,           # what the out-of-memory retry changed
               "reason": str | null}],
     "curve": {"job": name | null, "step": [...], "loss": [...], "lr": [...]},  # <= 500 points
     "log_tail": [the last 40 lines of the job's log]}

``curve`` and ``log_tail`` are the running job's, or once it has ended the last job's that ran.

Jobs are listed finished first (in the order they ran), then the running one, then the waiting ones
in the order they will run. ``folder`` is the output folder for a single training. A queue that
stopped after the current job (Ctrl+C or the page's button) ends "finished" too, its remaining
jobs "waiting". The curve holds the mean of each of at most 500 equal runs of steps (NaN losses of
skipped steps left out).

Progress events (child -> queue)
--------------------------------
Each queue job trains in a child process (``frontend/job.py``), which appends one JSON object per
line to ``queue_state/<job>/progress.jsonl`` and flushes it: ``{"event": "start", "time",
"total_steps", "start_step", "output_dir", "output_name"}``, ``{"event": "step", "time", "step",
"total_steps", "loss", "lr", "epoch"}``, ``{"event": "saved", "time", "path"}``, ``{"event":
"samples", "time", "paths"}``, ``{"event": "end", "time", "output"}``. The queue reads the new
lines as they come (:class:`EventReader`) and feeds them to the job's :class:`JobTracker`; the
child's stdout and stderr are only its log. A resumed job appends to the same file: the steps after
its state are trained again, and the curve drops its points from that step on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .json_io import write_json_atomic
from .queue_control import training_status_path
from .queue_files import STATUS_FILE

__all__ = ["VERSION", "JobTracker", "StatusFile", "EventReader", "EventWriter", "status_document",
           "queue_status_path", "status_path_for_run", "queue_eta", "CURVE_POINTS", "LOG_TAIL_LINES",
           "RunStatusCallbacks"]

VERSION = 1
CURVE_POINTS = 500
LOG_TAIL_LINES = 40
_SPEED_WINDOW = 30  # steps the it/s is measured over


def queue_status_path(folder: str) -> str:
    return os.path.join(os.path.abspath(folder), STATUS_FILE)


def status_path_for_run(output_folder: str, output_name: str) -> str:
    """Where a single training (no queue) keeps its status (queue_control.training_status_path, absolute)."""
    return training_status_path(os.path.abspath(output_folder), output_name)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class JobTracker:
    """One job's line in the status file, kept up to date from its progress events."""

    name: str
    state: str = "waiting"
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    output_dir: str | None = None
    output_name: str | None = None
    last_saved: str | None = None
    samples: list[str] = field(default_factory=list)
    log: str | None = None
    seconds: float | None = None
    retried: str | None = None
    reason: str | None = None
    cost: float | None = None  # images x pixels per step, to carry one job's speed over to another's ETA
    ignore_saves: tuple[str, ...] = ()  # the queue's own timed states are not "last saved"
    _steps: list[int] = field(default_factory=list, repr=False)
    _losses: list[float] = field(default_factory=list, repr=False)
    _lrs: list[float] = field(default_factory=list, repr=False)
    _speed: deque = field(default_factory=lambda: deque(maxlen=_SPEED_WINDOW), repr=False)

    @property
    def eta_seconds(self) -> float | None:
        if self.state != "running" or not self.it_per_s or self.total_steps is None:
            return None
        return max(0, self.total_steps - (self.step or 0)) / self.it_per_s

    def apply(self, event: dict) -> None:
        kind, now = event.get("event"), float(event.get("time") or time.time())
        if kind == "start":
            self.total_steps = event.get("total_steps", self.total_steps)
            self.step = event.get("start_step") or 0
            self.output_dir = event.get("output_dir") or self.output_dir
            self.output_name = event.get("output_name") or self.output_name
            self._speed.clear()
            self._cut_curve(self.step + 1)
        elif kind == "step":
            step = int(event["step"])
            self._cut_curve(step)
            self.step, self.epoch = step, event.get("epoch")
            self.total_steps = event.get("total_steps", self.total_steps)
            self.loss, self.lr = _finite(event.get("loss")), _finite(event.get("lr"))
            self._steps.append(step)
            self._losses.append(self.loss if self.loss is not None else math.nan)
            self._lrs.append(self.lr if self.lr is not None else math.nan)
            self._speed.append((now, step))
            self._measure_speed()
        elif kind == "saved":
            path = os.path.abspath(event["path"])
            if not any(path == own or path.startswith(own + os.sep) for own in self.ignore_saves):
                self.last_saved = path
        elif kind == "samples":
            self.samples = [os.path.abspath(p) for p in event.get("paths") or []]

    def _cut_curve(self, step: int) -> None:
        while self._steps and self._steps[-1] >= step:
            self._steps.pop()
            self._losses.pop()
            self._lrs.pop()

    def _measure_speed(self) -> None:
        (t0, s0), (t1, s1) = self._speed[0], self._speed[-1]
        if t1 > t0 and s1 > s0:
            self.it_per_s = (s1 - s0) / (t1 - t0)

    def curve(self, points: int = CURVE_POINTS) -> dict[str, list]:
        """Step, loss and lr of each of at most ``points`` equal runs of steps (their means; the run's last step)."""
        n = len(self._steps)
        if n <= points:
            groups = [(i, i + 1) for i in range(n)]
        else:
            edges = [round(i * n / points) for i in range(points + 1)]
            groups = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
        out: dict[str, list] = {"step": [], "loss": [], "lr": []}
        for a, b in groups:
            out["step"].append(self._steps[b - 1])
            out["loss"].append(_mean(self._losses[a:b]))
            out["lr"].append(_mean(self._lrs[a:b]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "step": self.step, "total_steps": self.total_steps,
                "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "it_per_s": self.it_per_s,
                "eta_seconds": self.eta_seconds, "output_dir": self.output_dir, "output_name": self.output_name,
                "last_saved": self.last_saved, "samples": list(self.samples), "log": self.log,
                "seconds": self.seconds, "retried": self.retried, "reason": self.reason}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def queue_eta(running: JobTracker | None, waiting: list[JobTracker], seconds_per_cost: float | None) -> float | None:
    """Seconds left for the whole queue: the running job's ETA, then each waiting job's steps at the
    measured speed, scaled by its images and pixels per step. None until a speed has been measured."""
    total = 0.0
    if running is not None:
        if running.eta_seconds is None:
            return None
        total += running.eta_seconds
    for job in waiting:
        if not seconds_per_cost or not job.total_steps or not job.cost:
            return None
        total += job.total_steps * job.cost * seconds_per_cost
    return total


def status_document(*, folder: str, state: str, started: float, jobs: list[JobTracker],
                    current: JobTracker | None, log_tail: list[str], eta_seconds: float | None) -> dict[str, Any]:
    """``current``: the running job, or the one that ran last; the curve and log tail are its."""
    curve = current.curve() if current is not None else {"step": [], "loss": [], "lr": []}
    return {"version": VERSION, "folder": os.path.abspath(folder), "pid": os.getpid(), "state": state,
            "started": started, "updated": time.time(), "eta_seconds": eta_seconds,
            "jobs": [job.to_dict() for job in jobs],
            "curve": {"job": current.name if current is not None else None, **curve},
            "log_tail": list(log_tail)[-LOG_TAIL_LINES:]}


class StatusFile:
    """Writes a status document atomically, at most once every ``interval`` seconds unless forced."""

    def __init__(self, path: str, interval: float = 1.0):
        self.path = path
        self.interval = interval
        self._last = -math.inf

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def write(self, document: dict[str, Any], *, force: bool = False) -> bool:
        if not force and not self.due():
            return False
        try:
            write_json_atomic(self.path, document)
        except OSError:
            return False  # a full disk or a vanished folder must not stop the training; the next write retries
        self._last = time.monotonic()
        return True


class EventWriter:
    """The child's side: append one event per line and flush it (the queue may read at any moment)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8", newline="\n")

    def write(self, kind: str, **values: Any) -> None:
        values = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._handle.write(json.dumps({"event": kind, "time": time.time(), **values}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class EventReader:
    """The queue's side: the complete lines added to a progress file since the last call."""

    def __init__(self, path: str):
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill, followed by the resumed run's lines
            if isinstance(event, dict):
                events.append(event)
        return events


class RunStatusCallbacks:
    """Training callbacks for a single training: forwards to ``inner`` (the console) and keeps
    ``<output_folder>/<output_name>_status.json`` up to date. Call :meth:`finish` at the end."""

    def __init__(self, inner: Any, output_folder: str, output_name: str, *, log: str | None = None):
        self._inner = inner
        self.folder = os.path.abspath(output_folder)
        self.job = JobTracker(name=output_name, state="running", output_dir=self.folder, output_name=output_name,
                              log=log)
        self.file = StatusFile(status_path_for_run(output_folder, output_name))
        self.started = time.time()
        self._state = "running"

    def __getattr__(self, name: str):  # any other callback goes to the console as it is
        return getattr(self._inner, name)

    def _event(self, kind: str, **values: Any) -> None:
        self.job.apply({"event": kind, "time": time.time(), **values})
        self._write(force=kind != "step")

    def _write(self, force: bool = False) -> None:
        document = status_document(folder=self.folder, state=self._state, started=self.started, jobs=[self.job],
                                   current=self.job, log_tail=[], eta_seconds=self.job.eta_seconds)
        self.file.write(document, force=force)

    def on_start(self, info: dict) -> None:
        self._inner.on_start(info)
        self._event("start", total_steps=info.get("max_train_steps"), start_step=int(info.get("start_step") or 0))

    def on_progress(self, step: int, total: int, loss: float, lr: float, epoch: int) -> None:
        self._inner.on_progress(step, total, loss, lr, epoch)
        self._event("step", step=step, total_steps=total, loss=loss, lr=lr, epoch=epoch)

    def on_save(self, path: str) -> None:
        self._inner.on_save(path)
        self._event("saved", path=path)

    def on_sample(self, paths: list[str]) -> None:
        self._inner.on_sample(paths)
        self._event("samples", paths=list(paths))

    def finish(self, state: str, reason: str | None = None) -> None:
        """``state`` is "complete", "failed" or "stopped". Writes nothing for a run that never started
        (a mistake found before training writes no file)."""
        if self.job.step is None:
            return
        self.job.state, self.job.reason = state, reason
        self.job.seconds = time.time() - self.started
        self._state = "finished"
        self._write(force=True)
