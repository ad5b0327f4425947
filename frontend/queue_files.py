"""The files a queue keeps in its own folder; none of them is ever taken for a job.

    queue.lock                   the lock against a second queue on the folder (queue_lock.py)
    queue_status.json            live status, rewritten at most once a second (queue_status.py)
    queue_control.json           requests from the status page: stop, order (queue_control.py)
    queue_summary.json / .txt    the end-of-queue summary (queue_summary.py)
    complete/  failed/           finished jobs' JSON files and logs
    queue_state/<job file>/      the running job's work folder (queue_recovery.py): the settings it
                                 runs with, its progress events and its latest training state; kept
                                 after a crash so the same queue command resumes it
    <job stem>.log               the running job's log (moves with its JSON when it ends)

Jobs are the folder's own ``*.json`` files (any case), hidden files skipped, minus the names above.
"""

from __future__ import annotations

from .queue_control import CONTROL_FILE, STATUS_FILE
from .queue_lock import LOCK_FILE

__all__ = ["LOCK_FILE", "STATUS_FILE", "CONTROL_FILE", "SUMMARY_JSON", "SUMMARY_TXT", "COMPLETE", "FAILED",
           "WORK_FOLDER", "QUEUE_FILES", "is_queue_file"]

SUMMARY_JSON = "queue_summary.json"
SUMMARY_TXT = "queue_summary.txt"
COMPLETE = "complete"
FAILED = "failed"
WORK_FOLDER = "queue_state"

QUEUE_FILES = frozenset({LOCK_FILE, STATUS_FILE, CONTROL_FILE, SUMMARY_JSON, SUMMARY_TXT, COMPLETE, FAILED,
                         WORK_FOLDER})


def is_queue_file(name: str) -> bool:
    """True for a name the queue itself writes in its folder (compared without regard to case)."""
    return name.casefold() in {n.casefold() for n in QUEUE_FILES}
