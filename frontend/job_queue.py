"""The training queue: every ``*.json`` in a folder, one after another, each in its own process.

All jobs are checked before the first one starts and every problem is listed at once; a job with a
problem is not run and goes to ``failed/`` with a log saying why. Each job runs as a child process,
so a crash or an out-of-memory in one cannot end the others. A finished job's JSON (and its log)
moves to ``complete/``, a failed one's to ``failed/``. The first Ctrl+C stops the queue after the
current job; a second one interrupts the current job as well. The exit code is 0 only if every job
trained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from sd_scripts.core.errors import ConfigError, UserError, UserErrors

from .json_io import saved_settings_dict, write_json_atomic
from .resolve import merge_job, validate_store

__all__ = ["JobOutcome", "list_jobs", "check_jobs", "run_queue", "job_command"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class JobOutcome:
    name: str
    result: str  # "complete", "failed", "not run" or "stopped"
    seconds: float = 0.0
    output: str | None = None
    reason: str | None = None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", name)]


def list_jobs(folder: str) -> list[str]:
    """The queue's JSON files (any case of ``.json``, hidden files skipped), in name order (job2 before job10)."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(".json") and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: (_natural_key(n), n))]


def _problem_lines(err: UserError) -> list[str]:
    if isinstance(err, UserErrors):
        return [str(e) for e in err.errors]
    return [str(err)]


def check_jobs(jobs: list[str], cli_values: dict, defaults: Any = None, *, check_engine: bool = True,
               say: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Resolve and check every job; return ({job: store}, {job: [problem, ...]})."""
    ready: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for job in jobs:
        name = os.path.basename(job)
        try:
            resolved = merge_job(job, cli_values, defaults)
            store = resolved.store
            for warning in resolved.warnings:
                say(f"warning: {warning}")
            validate_store(store)
            if check_engine:
                from .training import prepare_training

                prepare_training(store, say=lambda text: None)
            ready[job] = store
        except UserError as err:
            problems[job] = _problem_lines(err)
    return ready, problems


def job_command(settings_path: str, result_path: str) -> list[str]:
    """The child process that trains one job."""
    return [sys.executable, "-m", "frontend.job", settings_path, result_path]


def _move(path: str, folder: str) -> str:
    """Move ``path`` into ``folder`` (created on demand) without overwriting; return the new path."""
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    target = os.path.join(folder, stem + ext)
    count = 2
    while os.path.exists(target):
        target = os.path.join(folder, f"{stem}-{count}{ext}")
        count += 1
    shutil.move(path, target)
    return target


class _Interrupts:
    """Ctrl+C once: stop after this job. Twice: interrupt the running job too. Three times: kill it."""

    def __init__(self, say: Callable[[str], None]):
        self.count = 0
        self.child: subprocess.Popen | None = None
        self._say = say
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no Ctrl+C handling
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self._say("\nCtrl+C: the queue stops after the current job (press Ctrl+C again to stop it now)")
        elif self.count == 2:
            self._say("\nCtrl+C again: stopping the current job now (a third Ctrl+C kills it)")
            self.stop_child()
        elif self.child is not None and self.child.poll() is None:
            self.child.kill()

    def stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            if os.name == "nt":
                child.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                child.send_signal(signal.SIGINT)
        except OSError:
            pass


def _run_child(command: list[str], log_path: str, interrupts: _Interrupts, echo: bool) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True  # the terminal's Ctrl+C reaches only the queue
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kwargs)
        interrupts.child = child
        try:
            fd = child.stdout.fileno()
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            try:
                return child.wait(timeout=120 if interrupts.count > 1 else None)
            except subprocess.TimeoutExpired:
                child.kill()
                return child.wait()
        finally:
            interrupts.child = None
            child.stdout.close()


def _format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_table(outcomes: list[JobOutcome]) -> str:
    rows = [("job", "result", "time", "output or reason")]
    for o in outcomes:
        rows.append((o.name, o.result, _format_time(o.seconds) if o.seconds else "-", o.output or (o.reason or "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + str(row[3]))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(lines)


def run_queue(folder: str, cli_values: dict | None = None, defaults: Any = None, *,
              command: Callable[[str, str], list[str]] = job_command, check_engine: bool = True,
              echo: bool = True, say: Callable[[str], None] = print) -> int:
    """Run every job in ``folder``; return the exit code (0 all trained, 1 any failed, 130 stopped)."""
    cli_values = dict(cli_values or {})
    if not os.path.isdir(folder):
        raise ConfigError(f"multi_run_folder: folder not found: {folder}", setting="multi_run_folder")
    jobs = list_jobs(folder)
    if not jobs:
        raise ConfigError(f"multi_run_folder: no .json files in {folder}", setting="multi_run_folder")

    say(f"queue: {len(jobs)} job(s) in {folder}; checking all of them first")
    ready, problems = check_jobs(jobs, cli_values, defaults, check_engine=check_engine, say=say)
    outcomes: dict[str, JobOutcome] = {}
    if problems:
        count = sum(len(lines) for lines in problems.values())
        say(f"{len(problems)} job(s) cannot run ({count} problem(s)); they go to failed/ and the others run:")
        for job, lines in problems.items():
            for line in lines:
                say(f"  {os.path.basename(job)}: {line}")
        for job, lines in problems.items():
            log_path = os.path.splitext(job)[0] + ".log"
            with open(log_path, "w", encoding="utf-8") as log:
                log.write("This job was not run; its settings have these problems:\n")
                log.writelines(f"{line}\n" for line in lines)
            _move(job, os.path.join(folder, "failed"))
            _move(log_path, os.path.join(folder, "failed"))
            outcomes[job] = JobOutcome(os.path.basename(job), "failed", reason=f"not run: {lines[0]}")
    else:
        say(f"all {len(jobs)} job(s) look fine")

    work = tempfile.mkdtemp(prefix="lets-queue-")
    try:
        with _Interrupts(say) as interrupts:
            for index, job in enumerate(jobs, 1):
                if job not in ready:
                    continue
                name = os.path.basename(job)
                if interrupts.count:
                    outcomes[job] = JobOutcome(name, "not run", reason="queue stopped")
                    continue
                say(f"\n=== job {index}/{len(jobs)}: {name} ===")
                stem = os.path.splitext(name)[0]
                settings_path = os.path.join(work, f"{index:04d}-settings.json")
                result_path = os.path.join(work, f"{index:04d}-result.json")
                write_json_atomic(settings_path, saved_settings_dict(ready[job]))
                log_path = os.path.join(folder, f"{stem}.log")
                start = time.monotonic()
                code = _run_child(command(settings_path, result_path), log_path, interrupts, echo)
                seconds = time.monotonic() - start
                output = None
                if os.path.isfile(result_path):
                    with open(result_path, encoding="utf-8") as handle:
                        output = json.load(handle).get("output_path")
                if code == 0:
                    outcome = JobOutcome(name, "complete", seconds, output)
                    _move(job, os.path.join(folder, "complete"))
                    _move(log_path, os.path.join(folder, "complete"))
                elif interrupts.count > 1:
                    outcome = JobOutcome(name, "stopped", seconds, reason="stopped by Ctrl+C; its JSON stays queued")
                else:
                    outcome = JobOutcome(name, "failed", seconds, reason=f"exit code {code}; see failed/{stem}.log")
                    _move(job, os.path.join(folder, "failed"))
                    _move(log_path, os.path.join(folder, "failed"))
                outcomes[job] = outcome
                say(f"=== {name}: {outcome.result} in {_format_time(seconds)} ===")
            stopped = interrupts.count > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ordered = [outcomes[job] for job in jobs if job in outcomes]
    say("\n" + summary_table(ordered))
    if any(o.result == "failed" for o in ordered):
        return 1
    if stopped:
        return 130
    return 0
