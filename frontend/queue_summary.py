"""The end-of-queue summary: printed, and written as ``queue_summary.json`` and ``queue_summary.txt``.

``queue_summary.json``::

    {"version": 1, "folder": abs path, "started": unix time, "finished": unix time, "exit_code": int,
     "jobs": [{"name": "job1.json", "result": "complete" | "failed" | "stopped" | "not run",
               "seconds": float, "output": abs path | null, "reason": str | null, "retried": str | null}]}

``queue_summary.txt`` is the table printed at the end. Both are replaced atomically at the end of
every queue run (a run that trained nothing new, too), so they always describe the last run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .json_io import write_json_atomic
from .queue_files import SUMMARY_JSON, SUMMARY_TXT

__all__ = ["JobOutcome", "format_time", "summary_table", "write_summary"]


@dataclass
class JobOutcome:
    name: str
    result: str  # "complete", "failed", "not run" or "stopped"
    seconds: float = 0.0
    output: str | None = None
    reason: str | None = None
    retried: str | None = None  # what the out-of-memory retry changed


def format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_table(outcomes: list[JobOutcome]) -> str:
    rows = [("job", "result", "time", "output or reason")]
    for o in outcomes:
        last = o.output or (o.reason or "-")
        if o.retried:
            last += f" (retried after running out of memory with {o.retried})"
        rows.append((o.name, o.result, format_time(o.seconds) if o.seconds else "-", last))
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + str(row[3]))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(lines)


def write_summary(folder: str, outcomes: list[JobOutcome], *, started: float, finished: float,
                  exit_code: int) -> tuple[str, str]:
    """Write both summary files into the queue folder; return their paths."""
    folder = os.path.abspath(folder)
    json_path, txt_path = os.path.join(folder, SUMMARY_JSON), os.path.join(folder, SUMMARY_TXT)
    write_json_atomic(json_path, {"version": 1, "folder": folder, "started": started, "finished": finished,
                                  "exit_code": exit_code, "jobs": [asdict(o) for o in outcomes]})
    from sd_scripts.files.atomic import atomic_save_text

    atomic_save_text(txt_path, summary_table(outcomes) + "\n")
    return json_path, txt_path
