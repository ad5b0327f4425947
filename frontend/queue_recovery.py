"""Crash recovery: each running job's work folder, ``<queue folder>/queue_state/<job file name>/``.

    job.json         the record: the job's settings as checked ("source"), the settings the child
                     trains with ("settings": the seed fixed, any out-of-memory changes), where it
                     writes ("output"), the attempt and what a retry changed
    settings.json    what the child process loads (``python -m frontend.job settings.json result.json``)
    result.json      the child's output file, once it has trained
    progress.jsonl   the child's progress events (see queue_status.py)
    state/           the job's latest training state, replaced atomically every
                     ``queue_state_every`` minutes by the child (only the latest is kept)

The folder is created when a job starts and removed when it ends (complete or failed). If the
queue dies instead -- SIGKILL, a crash, a power cut -- the folder stays, and the next run of the
same queue command finds it: when the job's JSON is unchanged, the job runs first, with the
recorded settings, from ``state/`` (or from its beginning when no state was saved yet). A job
edited in between starts again with its new settings.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from .json_io import write_json_atomic
from .queue_files import WORK_FOLDER

__all__ = ["JobWork", "interrupted_jobs"]

RECORD_VERSION = 1


class JobWork:
    """The work folder of the job file ``name`` in queue ``folder``."""

    def __init__(self, folder: str, name: str):
        self.name = name
        self.dir = os.path.join(os.path.abspath(folder), WORK_FOLDER, name)
        self.record_path = os.path.join(self.dir, "job.json")
        self.settings_path = os.path.join(self.dir, "settings.json")
        self.result_path = os.path.join(self.dir, "result.json")
        self.events_path = os.path.join(self.dir, "progress.jsonl")
        self.state_path = os.path.join(self.dir, "state")

    def read_record(self) -> dict[str, Any] | None:
        try:
            with open(self.record_path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            return None
        return record

    def write_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_path, {"version": RECORD_VERSION, **record})

    def latest_state(self) -> str | None:
        """The complete state the child saved last, or None; cleans up after a save a kill cut short."""
        from sd_scripts.core.errors import UserError
        from sd_scripts.training.state import read_progress, recover_output_folder

        recover_output_folder(self.dir, os.path.basename(self.state_path))
        if not os.path.isdir(self.state_path):
            return None
        try:
            read_progress(self.state_path)
        except UserError:
            return None
        return self.state_path

    def state_step(self) -> int | None:
        from sd_scripts.training.state import read_progress

        try:
            return int(read_progress(self.state_path).get("global_step", 0))
        except Exception:  # noqa: BLE001 - only for a message
            return None

    def start_fresh(self) -> None:
        """Forget an earlier run of this job: its record, state and progress."""
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, exist_ok=True)

    def forget_state(self) -> None:
        shutil.rmtree(self.state_path, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        parent = os.path.dirname(self.dir)
        try:
            os.rmdir(parent)  # only when no other job's folder is left
        except OSError:
            pass


def interrupted_jobs(folder: str) -> set[str]:
    """Names of the jobs whose work folder holds a record (they were running when the queue died)."""
    root = os.path.join(os.path.abspath(folder), WORK_FOLDER)
    try:
        names = os.listdir(root)
    except OSError:
        return set()
    return {name for name in names if JobWork(folder, name).read_record() is not None}
