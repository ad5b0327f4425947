"""The training queue: the ``*.json`` files of a folder, one after another, each in its own process.

* **Checked first.** Every job is checked before the first one starts and every problem is listed
  at once; a job with a problem is not run and goes to ``failed/`` with a log saying why. A JSON
  that holds no training setting is not a job and goes there too. Two jobs that would write the
  same output name into the same folder, or a job whose output files are already there, are caught
  by the same check, with the fix in the message: nothing is overwritten (queue_outputs.py).
* **A live folder.** Between jobs the folder is read again: a JSON added meanwhile is checked and
  queued, one deleted or moved out before its turn is dropped, one edited is checked again and runs
  with its new settings, and the order follows the names at that moment (job2 before job10;
  rename to reorder). The status page's requests in ``queue_control.json`` (queue_control.py) can
  put waiting jobs in another order and stop the queue after the current job.
* **One queue per folder.** ``queue.lock`` keeps a second queue process off the folder; a lock left
  by a dead process is taken over (queue_lock.py).
* **Each job in its own process** (``frontend/job.py``), so a crash in one cannot end the others.
  Its output goes to ``<job stem>.log`` with a timestamp on every line. A finished job's JSON and log
  move to ``complete/``, a failed one's to ``failed/``.
* **Crash recovery.** The running job saves a training state every ``queue_state_every`` minutes
  into its work folder ``queue_state/<job>/``; after a kill or a power cut the same queue command
  resumes it from there, bit for bit (queue_recovery.py).
* **Out of memory** is retried once with memory savers turned on (queue_retry.py).
* **Status and summary.** ``queue_status.json`` is kept up to date while the queue runs
  (queue_status.py); the end summary is printed and written as ``queue_summary.json`` / ``.txt``
  (queue_summary.py).

The first Ctrl+C stops the queue after the current job; a second one interrupts the current job as
well (its JSON and its latest state stay, so the next run resumes it). Exit code: 0 when every job
trained, 1 when any failed, 130 when the queue stopped before the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from sd_scripts.core.errors import ConfigError, UserError, UserErrors

from .json_io import saved_settings_dict, write_json_atomic
from .queue_child import Interrupts, JobLog, run_child
from .queue_control import ordered, read_control, set_stop_after_current
from .queue_files import COMPLETE, FAILED, is_queue_file
from .queue_lock import QueueLock
from .queue_outputs import OutputTarget, clash_error, existing_outputs, overwrite_error, target_of
from .queue_recovery import JobWork, interrupted_jobs
from .queue_retry import EXIT_OUT_OF_MEMORY, memory_retry
from .queue_status import EventReader, JobTracker, StatusFile, queue_eta, queue_status_path, status_document
from .queue_summary import JobOutcome, format_time, summary_table, write_summary
from .resolve import merge_job, validate_store

__all__ = ["JobOutcome", "QueuedJob", "list_jobs", "check_job", "queue_lock", "run_queue", "job_command"]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", name)]


def list_jobs(folder: str) -> list[str]:
    """The queue's JSON files (any case of ``.json``, hidden files and the queue's own files skipped), in
    name order (job2 before job10)."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(".json") and not n.startswith(".") and not is_queue_file(n)
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: (_natural_key(n), n))]


def job_command(settings_path: str, result_path: str) -> list[str]:
    """The child process that trains one job."""
    return [sys.executable, "-m", "frontend.job", settings_path, result_path]


# ------------------------------------------------------------------------------------------- checking
@dataclass
class QueuedJob:
    """A job file that passed its checks, as it was when checked."""

    path: str
    digest: str  # of the file's bytes: a changed digest means the job was edited
    store: Any
    target: OutputTarget
    total_steps: int | None = None
    cost: float | None = None  # images x pixels per step (for the queue's ETA)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def _problem_lines(err: UserError) -> list[str]:
    if isinstance(err, UserErrors):
        return [str(e) for e in err.errors]
    return [str(err)]


def _not_a_job(path: str) -> None:
    """A JSON that holds no setting at all (a dataset's metadata, some other tool's file) is no job."""
    from ArgsList import ArgStore

    from .json_io import is_kohya_ss_file, load_settings_file, read_json_file

    data = read_json_file(path)
    if isinstance(data, dict) and (not data or is_kohya_ss_file(data)):
        return
    if isinstance(data, dict) and load_settings_file(path, ArgStore).values:
        return
    what = "none of its keys is a training setting" if isinstance(data, dict) else f"it holds a {type(data).__name__}"
    raise ConfigError(f"{os.path.basename(path)}: not a training job ({what}); move it out of the queue folder",
                      setting="multi_run_folder")


def _cost(store: Any) -> float:
    width = store.train_resolution or 512
    return float(store.batch_size or 1) * (store.gradient_acc_steps or 1) * width * (store.height_resolution or width)


def check_job(path: str, cli_values: dict, defaults: Any = None, *, check_engine: bool = True,
              say: Callable[[str], None] = print) -> QueuedJob:
    """Resolve and check one job file; raises UserError(s) with every problem."""
    digest = _digest(path)
    _not_a_job(path)
    resolved = merge_job(path, cli_values, defaults)
    store = resolved.store
    for warning in resolved.warnings:
        say(f"warning: {warning}")
    validate_store(store)
    total_steps = store.max_steps or None
    if check_engine:
        from .training import prepare_training

        _mapped, plan = prepare_training(store, say=lambda text: None)
        total_steps = getattr(plan, "steps", None) or total_steps
    return QueuedJob(path, digest or "", store, target_of(store), total_steps, _cost(store))


def _fix_seed(store: Any) -> Any:
    """The queue picks a job's unset seed itself, once, so a resumed job keeps the seed it started with."""
    if store.test_seed is None:
        return store.replace(test_seed=random.randint(0, 2**31 - 1))
    return store


# ------------------------------------------------------------------------------------------- the queue
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


@dataclass
class _Queue:
    folder: str
    cli_values: dict
    defaults: Any
    command: Callable[[str, str], list[str]]
    check_engine: bool
    echo: bool
    say: Callable[[str], None]
    started: float = field(default_factory=time.time)
    jobs: dict[str, QueuedJob] = field(default_factory=dict)  # by file name: checked, waiting
    trackers: dict[str, JobTracker] = field(default_factory=dict)  # by file name: the waiting jobs' status lines
    done: list[JobTracker] = field(default_factory=list)  # status lines of the jobs that ended, in order
    outcomes: list[JobOutcome] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # waiting jobs' names, in the order they will run
    interrupted: set[str] = field(default_factory=set)
    running: JobTracker | None = None
    log: JobLog | None = None
    seconds_per_cost: float | None = None
    stop_requested: bool = False
    interrupts: Interrupts | None = None
    started_jobs: int = 0

    def __post_init__(self):
        self.status = StatusFile(queue_status_path(self.folder))
        self._job_started = time.time()

    # ---------------------------------------------------------------- the folder
    def refresh(self, *, first: bool = False) -> None:
        """Read the folder again: new and edited jobs are checked, vanished ones dropped, the order renewed."""
        present = {os.path.basename(p): p for p in list_jobs(self.folder)}
        for name in [n for n in self.jobs if n not in present]:
            self.say(f"queue: {name} is no longer in the folder; dropped")
            del self.jobs[name]
            self.trackers.pop(name, None)
        fresh = [n for n in present if n not in self.jobs or self.jobs[n].digest != _digest(present[n])]
        if not first:
            for name in fresh:
                self.say(f"queue: {name} was edited; checking it again" if name in self.jobs
                         else f"queue: new job {name}; checking it")
        for name in fresh:
            self.jobs.pop(name, None)
        problems: dict[str, list[str]] = {}
        claims = {job.target.key: name for name, job in self.jobs.items()}
        for name in self._in_order(list(present)):
            if name not in fresh:
                continue
            try:
                job = check_job(present[name], self.cli_values, self.defaults, check_engine=self.check_engine,
                                say=self.say)
                clash = self._output_problem(job, claims)
                if clash is not None:
                    raise clash
            except UserError as err:
                problems[name] = _problem_lines(err)
                continue
            claims[job.target.key] = name
            self.jobs[name] = job
            self.trackers[name] = self._tracker_for(job)
        self._report_problems(problems, present, first=first)
        self.order = self._in_order([n for n in present if n in self.jobs])

    def _in_order(self, names: list[str]) -> list[str]:
        """Interrupted jobs first, then the page's requested order, then name order."""
        names = sorted(names, key=lambda n: (_natural_key(n), n))
        first = [n for n in names if n in self.interrupted]
        return first + ordered([n for n in names if n not in self.interrupted], read_control(self.folder))

    def _output_problem(self, job: QueuedJob, claims: dict) -> UserError | None:
        other = claims.get(job.target.key)
        if other is not None and other != job.name:
            return clash_error(job.name, job.target, other)
        if self._own_outputs(job):
            return None
        existing = existing_outputs(job.target)
        return overwrite_error(job.name, job.target, existing) if existing else None

    def _own_outputs(self, job: QueuedJob) -> bool:
        """The job was interrupted in an earlier run: the files at its target are its own."""
        record = JobWork(self.folder, job.name).read_record()
        return bool(record) and record.get("output") == [job.target.folder, job.target.name, job.target.ext]

    def _tracker_for(self, job: QueuedJob) -> JobTracker:
        return JobTracker(name=job.name, total_steps=job.total_steps, output_dir=job.target.folder,
                          output_name=job.target.name, cost=job.cost)

    def _report_problems(self, problems: dict[str, list[str]], present: dict[str, str], *, first: bool) -> None:
        if not problems:
            if first:
                self.say(f"all {len(present)} job(s) look fine")
            return
        count = sum(len(lines) for lines in problems.values())
        self.say(f"{len(problems)} job(s) cannot run ({count} problem(s)); they go to failed/"
                 + (" and the others run:" if first else ":"))
        for name, lines in problems.items():
            for line in lines:
                self.say(f"  {line}" if line.startswith(f"{name}: ") else f"  {name}: {line}")
        for name, lines in problems.items():
            job_path = present[name]
            log_path = os.path.splitext(job_path)[0] + ".log"
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "This job was not run; its settings have these "
                          "problems:\n")
                log.writelines(f"{line}\n" for line in lines)
            _move(job_path, os.path.join(self.folder, FAILED))
            _move(log_path, os.path.join(self.folder, FAILED))
            JobWork(self.folder, name).remove()
            self._finish_tracker(JobTracker(name=name), "failed", reason=f"not run: {lines[0]}",
                                 log=os.path.join(self.folder, FAILED, os.path.basename(log_path)))
            self.outcomes.append(JobOutcome(name, "failed", reason=f"not run: {lines[0]}"))

    # ---------------------------------------------------------------- status
    def _state(self) -> str:
        return "stopping" if self.stop_requested else "running"

    def write_status(self, *, force: bool = False, state: str | None = None) -> None:
        if not force and not self.status.due():
            return
        waiting = [self.trackers[n] for n in self.order if n in self.trackers
                   and (self.running is None or n != self.running.name)]
        jobs = self.done + ([self.running] if self.running else []) + waiting
        if self.running is not None:
            self.running.seconds = time.time() - self._job_started
            if self.running.it_per_s and self.running.cost:
                self.seconds_per_cost = 1.0 / (self.running.it_per_s * self.running.cost)
        current = self.running or (self.done[-1] if self.done else None)
        eta = None if (state or self._state()) == "finished" else queue_eta(self.running, waiting,
                                                                            self.seconds_per_cost)
        document = status_document(folder=self.folder, state=state or self._state(), started=self.started,
                                   jobs=jobs, current=current, log_tail=self.log.tail_lines() if self.log else [],
                                   eta_seconds=eta)
        self.status.write(document, force=force)

    def _finish_tracker(self, tracker: JobTracker, state: str, *, reason: str | None = None,
                        log: str | None = None) -> None:
        tracker.state, tracker.reason = state, reason
        if log:
            tracker.log = log
        self.done.append(tracker)

    def _check_stop(self) -> bool:
        """Ctrl+C (for good) or the page's request (which the page may take back) stops after the current job."""
        ctrl_c = bool(self.interrupts.count)
        wanted = ctrl_c or read_control(self.folder).stop_after_current
        if wanted != self.stop_requested and not ctrl_c:
            self.say("queue: stop requested (queue_control.json): the queue stops after the current job" if wanted
                     else "queue: the stop request was taken back; the queue goes on")
        self.stop_requested = wanted
        return wanted

    # ---------------------------------------------------------------- running
    def run(self) -> int:
        if read_control(self.folder).stop_after_current:
            set_stop_after_current(self.folder, False)  # a request of an earlier run
        self.interrupted = interrupted_jobs(self.folder)
        present = list_jobs(self.folder)
        if not present:
            raise ConfigError(f"multi_run_folder: no .json files in {self.folder}; put the job files of the queue "
                              "there", setting="multi_run_folder")
        self.say(f"queue: {len(present)} job(s) in {self.folder}; checking all of them first")
        self.refresh(first=True)
        with Interrupts(self.say) as interrupts:
            self.interrupts = interrupts
            self.write_status(force=True)
            while not self._check_stop():
                if self.done or self.running:
                    self.refresh()
                if not self.order:
                    break
                self.run_job(self.jobs[self.order[0]])
                self.write_status(force=True)
        return self.finish()

    def run_job(self, job: QueuedJob) -> None:
        name, stem = job.name, os.path.splitext(job.name)[0]
        self.started_jobs += 1
        index, total = self.started_jobs, self.started_jobs + len(self.order) - 1
        tracker = self.trackers.pop(name)
        self.order.remove(name)
        del self.jobs[name]
        work = JobWork(self.folder, name)
        log_path = os.path.join(self.folder, f"{stem}.log")
        if not self._own_outputs(job) and existing_outputs(job.target):
            err = overwrite_error(name, job.target, existing_outputs(job.target))
            self._report_problems({name: [str(err)]}, {name: job.path}, first=False)
            return
        self.say(f"\n=== job {index}/{total}: {name} ===")
        self.log = JobLog(log_path)
        tracker.state, tracker.log = "running", log_path
        self.running, self._job_started = tracker, time.time()
        try:
            settings, attempt, resume = self._prepare(job, work)
            code = self._attempt(job, work, settings, resume, attempt)
            if code == EXIT_OUT_OF_MEMORY and attempt == 1:
                code = self._retry(job, work, tracker)
        finally:
            self.running = None
        self._end_job(job, work, tracker, code, log_path, stem)

    def _prepare(self, job: QueuedJob, work: JobWork) -> tuple[dict, int, str | None]:
        """The child's settings, the attempt number and the state to resume from (None: from the start)."""
        source = json.loads(json.dumps(saved_settings_dict(job.store)))  # as the record holds it
        record = work.read_record()
        if record is not None and record.get("source") == source:
            state = work.latest_state()
            self.running.retried = record.get("retried")
            if state:
                text = f"resuming {job.name} from its state at step {work.state_step()}"
            else:
                text = f"{job.name} was interrupted before its first state was saved; starting it again"
            self.say(f"queue: {text}")
            self.log.note(f"=== queue: {text} ===")
            return record["settings"], int(record.get("attempt", 1)), state
        if record is not None:
            self.say(f"queue: {job.name} was edited after it was interrupted; starting it again with the new settings")
        work.start_fresh()
        settings = saved_settings_dict(_fix_seed(job.store))
        work.write_record({"job": job.name, "source": source, "settings": settings, "attempt": 1, "retried": None,
                           "output": [job.target.folder, job.target.name, job.target.ext]})
        self.log.note(f"=== queue: {job.name} started ===")
        return settings, 1, None

    def _attempt(self, job: QueuedJob, work: JobWork, settings: dict, resume: str | None, attempt: int) -> int:
        child_settings = dict(settings)
        if resume:
            child_settings.update(resume=resume, initial_step=None, initial_epoch=None)
        else:
            work.forget_state()
            if os.path.exists(work.events_path):
                os.remove(work.events_path)
        write_json_atomic(work.settings_path, child_settings)
        reader = EventReader(work.events_path)
        tracker = self.running
        tracker.ignore_saves = (work.state_path,)

        def poll() -> None:
            for event in reader.read():
                tracker.apply(event)
            self._check_stop()
            self.write_status()

        env = {"LETS_QUEUE_EVENTS": work.events_path, "LETS_QUEUE_STATE": work.state_path,
               "LETS_QUEUE_ATTEMPT": str(attempt)}
        return run_child(self.command(work.settings_path, work.result_path), self.log, self.interrupts,
                         echo=self.echo, env=env, poll=poll)

    def _retry(self, job: QueuedJob, work: JobWork, tracker: JobTracker) -> int:
        record = work.read_record()
        current = job.store.replace(**_store_values(record["settings"], job.store))
        retry = memory_retry(current, self._passes_checks)
        if retry is None:
            self.say(f"queue: {job.name} ran out of GPU memory with every memory saver on already; not retried")
            self.log.note("=== queue: out of GPU memory with every memory saver on already; not retried ===")
            return EXIT_OUT_OF_MEMORY
        state = work.latest_state() if retry.keeps_batches else None
        settings = saved_settings_dict(retry.store)
        record.update(settings=settings, attempt=2, retried=retry.change)
        work.write_record(record)
        tracker.retried = retry.change
        start = f"from its state at step {work.state_step()}" if state else "from the start"
        self.say(f"queue: {job.name} ran out of GPU memory; retrying once with {retry.change}, {start}")
        self.log.note(f"=== queue: out of GPU memory; retrying once with {retry.change}, {start} ===")
        return self._attempt(job, work, settings, state, 2)

    def _passes_checks(self, store: Any) -> bool:
        try:
            validate_store(store)
            if self.check_engine:
                from .training import prepare_training

                prepare_training(store, say=lambda text: None)
        except UserError:
            return False
        return True

    def _end_job(self, job: QueuedJob, work: JobWork, tracker: JobTracker, code: int, log_path: str,
                 stem: str) -> None:
        seconds = time.time() - self._job_started
        output = None
        if os.path.isfile(work.result_path):
            with open(work.result_path, encoding="utf-8") as handle:
                output = json.load(handle).get("output_path")
        if code == 0:
            result, reason, where = "complete", None, COMPLETE
        elif self.interrupts.count > 1:
            result, where = "stopped", None
            reason = "stopped by Ctrl+C; its JSON stays queued and the next run resumes it"
        elif code == EXIT_OUT_OF_MEMORY:
            result, where = "failed", FAILED
            reason = f"out of GPU memory{' again' if tracker.retried else ''}; see failed/{stem}.log"
        else:
            result, where = "failed", FAILED
            reason = f"exit code {code}; see failed/{stem}.log"
        self.log.note(f"=== queue: {job.name} {result} after {format_time(seconds)} (exit code {code}) ===")
        self.log.close()
        if where is not None:
            _move(job.path, os.path.join(self.folder, where))
            log_path = _move(log_path, os.path.join(self.folder, where))
            work.remove()
        tracker.seconds = seconds
        self._finish_tracker(tracker, result, reason=reason, log=log_path)
        self.outcomes.append(JobOutcome(job.name, result, seconds, output if code == 0 else None, reason,
                                        tracker.retried))
        self.say(f"=== {job.name}: {result} in {format_time(seconds)} ===")

    def finish(self) -> int:
        stopped = self.stop_requested and bool(self.order)
        for name in self.order:
            self.outcomes.append(JobOutcome(name, "not run", reason="queue stopped"))
        if read_control(self.folder).stop_after_current:
            set_stop_after_current(self.folder, False)
        if any(o.result == "failed" for o in self.outcomes):
            code = 1
        elif stopped or any(o.result == "stopped" for o in self.outcomes):
            code = 130
        else:
            code = 0
        self.write_status(force=True, state="finished")
        self.say("\n" + summary_table(self.outcomes))
        try:
            write_summary(self.folder, self.outcomes, started=self.started, finished=time.time(), exit_code=code)
        except OSError as err:
            self.say(f"warning: the summary could not be written into {self.folder} ({err.strerror})")
        return code


def _store_values(settings: dict, store: Any) -> dict:
    names = {info.name for info in store.settings()}
    return {k: v for k, v in settings.items() if k in names}


@contextlib.contextmanager
def queue_lock(folder: str) -> Iterator[str]:
    """Check that ``folder`` is a folder and hold its lock; yields its absolute path. main.py takes it before it
    starts the status page, so a second queue on the folder hears who runs it (not that the port is taken)."""
    if not os.path.exists(folder):
        raise ConfigError(f"multi_run_folder: folder not found: {folder}", setting="multi_run_folder")
    if not os.path.isdir(folder):
        raise ConfigError(f"multi_run_folder: {folder} is a file, not a folder; give the folder that holds the "
                          "queue's job JSON files", setting="multi_run_folder")
    folder = os.path.abspath(folder)
    with QueueLock(folder):
        yield folder


def run_queue(folder: str, cli_values: dict | None = None, defaults: Any = None, *,
              command: Callable[[str, str], list[str]] = job_command, check_engine: bool = True,
              echo: bool = True, say: Callable[[str], None] = print, locked: bool = False) -> int:
    """Run every job in ``folder``; return the exit code (0 all trained, 1 any failed, 130 stopped).
    ``locked``: the caller holds :func:`queue_lock` already."""
    with contextlib.nullcontext(os.path.abspath(folder)) if locked else queue_lock(folder) as folder:
        queue = _Queue(folder, dict(cli_values or {}), defaults, command, check_engine, echo, say)
        return queue.run()
